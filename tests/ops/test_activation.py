"""silu_and_mul against ops.ref: odd widths, 3-D and strided inputs, extremes, bad arguments."""

from __future__ import annotations

import pytest
import torch
from ops_testing import DEVICES, assert_close, strided_rows
from professional_nano_llm import ops
from professional_nano_llm.ops import ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("num_tokens", [1, 7, 83])
@pytest.mark.parametrize("d", [8, 111, 769, 1536])
def test_silu_and_mul(device, dtype, num_tokens, d):
    x = torch.randn(num_tokens, 2 * d, dtype=dtype, device=device) * 3
    out = torch.empty(num_tokens, d, dtype=dtype, device=device)
    ops.silu_and_mul(out, x)
    assert_close(out, ref.silu_and_mul(x), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_3d_and_strided(device, dtype):
    x = torch.randn(3, 5, 2 * 96, dtype=dtype, device=device)
    out = torch.empty(3, 5, 96, dtype=dtype, device=device)
    ops.silu_and_mul(out, x)
    assert_close(out, ref.silu_and_mul(x), dtype)

    x = strided_rows(17, (2 * 200,), dtype, device)
    out = strided_rows(17, (200,), dtype, device, pad=3)
    ops.silu_and_mul(out, x)
    assert_close(out, ref.silu_and_mul(x), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_silu_and_mul_extremes(device):
    """Large |gate| saturates silu to 0 or gate without inf or nan."""
    gate = torch.tensor(
        [-1e4, -100.0, -88.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 88.0, 100.0, 1e4], device=device
    )
    x = torch.cat([gate, torch.full_like(gate, 2.0)])[None]
    out = torch.empty(1, gate.numel(), device=device)
    ops.silu_and_mul(out, x)
    assert torch.isfinite(out).all()
    assert_close(out, ref.silu_and_mul(x), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("out_shape", "x_shape", "x_dtype", "message"),
    [
        ((4, 64), (4, 127), torch.float32, "2 \\* d"),
        ((4, 64), (5, 128), torch.float32, "2 \\* d"),
        ((4, 64), (4, 128), torch.float64, "one dtype"),
        ((2, 2, 2, 8), (2, 2, 2, 16), torch.float32, "1 to 3 dims"),
    ],
)
def test_silu_and_mul_rejects(device, out_shape, x_shape, x_dtype, message):
    out = torch.empty(out_shape, device=device)
    x = torch.randn(x_shape, dtype=x_dtype, device=device)
    with pytest.raises(RuntimeError, match=message):
        ops.silu_and_mul(out, x)
