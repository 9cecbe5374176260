"""Linear layers whose weights the loader fills; several projections of one input can share one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from professional_nano_llm import ops

# On CPU, float32 matmuls run in pnl.linear over weights packed once into blocks of 16 output
# features (ops.pack_linear_weight). Measured over SmolLM2's layers on 2 Zen 4 cores, decoding one
# sequence reads them at 27-33 GB/s where torch's best path (oneDNN on its own prepacked layout)
# reads 16-18, and 32-row steps run at ~190 GFLOP/s against its 113-138. bfloat16 weights go to
# oneDNN's prepacked layout instead where the CPU has oneDNN's bf16 path (AVX-512 BW/VL/DQ or
# AVX-NE-CONVERT): its bf16 dot-product instructions run batched steps about 2x faster than
# pnl.linear's fp32 FMAs. Without them (AVX2 CPUs) oneDNN refuses to pack bf16, and pnl.linear,
# which widens bf16 to fp32 as it loads, beats F.linear 2-3.6x. GPUs keep the plain weight for cuBLAS.
_ONEDNN_BF16_LINEAR = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                       and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def prepack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] weight -> the layout `linear` runs fastest on this device: on CPU, [out / 16, in, 16]
    blocks (out a multiple of 16, as in every supported model), or a oneDNN tensor for bfloat16 where
    oneDNN has a bf16 path on this CPU; elsewhere unchanged."""
    if weight.dim() == 3 or weight.is_mkldnn or weight.device.type != "cpu":
        return weight  # already packed, or a GPU's
    if weight.dtype == torch.bfloat16 and _ONEDNN_BF16_LINEAR:
        return torch.ops.mkldnn._reorder_linear_weight(weight)
    if weight.shape[0] % ops.LINEAR_BLOCK == 0:
        return ops.pack_linear_weight(weight)
    return weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight^T + bias, for a plain or prepacked weight."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # the models' [T, in] needs no reshape
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], weight.shape[0] * ops.LINEAR_BLOCK, dtype=x.dtype, device=x.device)
    ops.linear(out, rows, weight, bias)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])


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
