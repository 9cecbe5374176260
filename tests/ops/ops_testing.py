"""Shared helpers of the op tests: devices, the tolerance table (design §5.4), paged KV caches."""

from __future__ import annotations

import pytest
import torch

from professional_nano_llm import ops

# A CPU case runs once per instruction set this build has kernels for and this CPU runs (conftest.py
# switches to it), so an AVX-512 machine tests the AVX2 and baseline kernels too.
CPU_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.cpu_isa(isa), id=f"cpu-{isa}") for isa in ops.supported_cpu_isas()
]
# CUDA kernels register later; a CUDA run is opted into with -m cuda, never skipped.
DEVICES = [*CPU_DEVICES, pytest.param("cuda", marks=pytest.mark.cuda)]

# Elementwise outputs: vLLM's defaults (from PyTorch's), float64 near exact.
TOLERANCES = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1.3e-6),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}
# Reductions (rms_norm) in half types: vLLM's "larger numerical errors" allowance.
REDUCTION_TOLERANCES = {
    **TOLERANCES,
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, table=TOLERANCES
) -> None:
    """actual (in dtype) against a float32/float64 reference, with the table's dtype tolerance."""
    torch.testing.assert_close(actual.to(expected.dtype), expected, **table[dtype])


def strided_rows(rows: int, shape: tuple[int, ...], dtype, device, pad: int = 7) -> torch.Tensor:
    """A [rows, *shape] view whose rows are `pad` elements wider than the data (a slice of a fused
    projection's output), last dim contiguous."""
    width = 1
    for s in shape:
        width *= s
    base = torch.randn(rows, width + pad, dtype=dtype, device=device)
    view = base[:, pad:].view(rows, *shape)
    assert not view.is_contiguous()
    return view


def paged_kv(context_lens, num_kv_heads, head_dim, block_size, dtype, device, spare_blocks=3):
    """Random K/V caches holding each context in shuffled blocks.

    Returns k_cache, v_cache [num_blocks, block_size, Hkv, D], block_tables [S, max_blocks] int32
    (unused entries -1, so reading one is an error) and context_lens [S] int32.
    """
    needed = [-(-c // block_size) for c in context_lens]
    max_blocks = max(needed + [1])
    num_blocks = sum(needed) + spare_blocks
    k_cache = torch.randn(
        num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
    )
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(num_blocks).tolist()
    block_tables = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int32)
    for s, n in enumerate(needed):
        block_tables[s, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return k_cache, v_cache, block_tables.to(device), lens.to(device)


def poisoned(*shape: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer full of NaN: an element the op fails to write fails the comparison (a
    fresh torch.empty on a GPU often holds an earlier, correct-looking result)."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
