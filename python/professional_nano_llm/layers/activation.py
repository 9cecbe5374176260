"""SwiGLU's gate: silu(gate) * up over the fused gate_up projection."""

from __future__ import annotations

import torch
from torch import nn

from professional_nano_llm import ops


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, 2 * d] -> [T, d]
        out = torch.empty(*x.shape[:-1], x.shape[-1] // 2, dtype=x.dtype, device=x.device)
        ops.silu_and_mul(out, x)
        return out
