"""RMSNorm, with the residual add of the next block fused in."""

from __future__ import annotations

import torch
from torch import nn

from professional_nano_llm import ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        ops.rms_norm(out, x, self.weight, self.eps)
        return out

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> None:
        """residual += x; x = rms_norm(residual), both in place."""
        ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
