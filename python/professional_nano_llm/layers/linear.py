"""Linear layers whose weights the loader fills; several projections of one input can share one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# On CPU, oneDNN's matmul over a weight reordered once into its blocked layout runs the small-batch
# matmuls of decoding 1.3-4x faster than F.linear over the plain [out, in] weight (measured on
# SmolLM2's shapes, M = 1..256; the vocabulary projection gains most).
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def prepack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] weight -> the layout `linear` runs fastest on this device (a oneDNN tensor on CPU)."""
    if weight.is_mkldnn:
        return weight  # already packed
    if _ONEDNN_LINEAR and weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16):
        return torch.ops.mkldnn._reorder_linear_weight(weight)
    return weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight^T + bias, for a plain or prepacked weight."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T + b with W [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype)
        self.bias = _param(out_features, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def prepack(self) -> None:
        """Once the weights are loaded: reorders W in place of the plain copy (no second copy is kept)."""
        self.weight = nn.Parameter(prepack_weight(self.weight.data), requires_grad=False)


class MergedLinear(Linear):
    """Projections of one input fused into one matmul: shard `name` owns rows [start, start + size)."""

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool, dtype: torch.dtype):
        super().__init__(in_features, sum(shards.values()), bias, dtype)
        self.shards: dict[str, slice] = {}
        start = 0
        for name, size in shards.items():
            self.shards[name] = slice(start, start + size)
            start += size
