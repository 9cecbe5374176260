"""Linear layers whose weights the loader fills; several projections of one input can share one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T + b with W [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype)
        self.bias = _param(out_features, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Projections of one input fused into one matmul: shard `name` owns rows [start, start + size)."""

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool, dtype: torch.dtype):
        super().__init__(in_features, sum(shards.values()), bias, dtype)
        self.shards: dict[str, slice] = {}
        start = 0
        for name, size in shards.items():
            self.shards[name] = slice(start, start + size)
            start += size
