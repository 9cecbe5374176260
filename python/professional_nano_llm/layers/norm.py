"""RMSNorm's weight and eps; the final norm runs here, with the last block's residual add fused in."""

from __future__ import annotations

import torch
from torch import nn

from professional_nano_llm import ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> None:
        """residual += x; x = rms_norm(residual), both in place."""
        ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
