"""rms_norm and fused_add_rms_norm against ops.ref: odd sizes, strided views, in place, errors."""

from __future__ import annotations

import pytest
import torch
from ops_testing import DEVICES, REDUCTION_TOLERANCES, assert_close, strided_rows
from professional_nano_llm import ops
from professional_nano_llm.ops import ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 83])
@pytest.mark.parametrize("hidden", [8, 111, 769, 4096])
def test_rms_norm(device, dtype, num_tokens, hidden):
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=device)
    weight = torch.randn(hidden, dtype=dtype, device=device)
    out = torch.empty_like(x)
    ops.rms_norm(out, x, weight, 1e-6)
    assert_close(out, ref.rms_norm(x, weight, 1e-6), dtype, REDUCTION_TOLERANCES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_qk_norm_view(device, dtype):
    """Qwen3's q/k norm: [T, H, D] view of a strided slice of qkv, normalised per head."""
    T, H, D = 19, 6, 128
    q = strided_rows(T, (H, D), dtype, device, pad=3 * D)
    weight = torch.randn(D, dtype=dtype, device=device)
    out = torch.empty(T, H, D, dtype=dtype, device=device)
    ops.rms_norm(out, q, weight, 1e-6)
    expected = ref.rms_norm(q, weight, 1e-6)
    assert_close(out, expected, dtype, REDUCTION_TOLERANCES)

    # Into a strided out as well, and in place.
    strided_out = strided_rows(T, (H, D), dtype, device, pad=5)
    ops.rms_norm(strided_out, q, weight, 1e-6)
    assert_close(strided_out, expected, dtype, REDUCTION_TOLERANCES)
    ops.rms_norm(q, q, weight, 1e-6)
    assert_close(q, expected, dtype, REDUCTION_TOLERANCES)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_1d_and_large_eps(device):
    x = torch.randn(333, device=device, dtype=torch.float64) * 1e-3
    weight = torch.rand(333, device=device, dtype=torch.float64)
    out = torch.empty_like(x)
    ops.rms_norm(out, x, weight, 0.5)  # eps dominates: the output is nearly x * weight / sqrt(eps)
    assert_close(out, ref.rms_norm(x, weight, 0.5), torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 83])
@pytest.mark.parametrize("hidden", [8, 111, 769, 4096])
def test_fused_add_rms_norm(device, dtype, num_tokens, hidden):
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=device)
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, dtype=dtype, device=device)
    expected_out, expected_residual = ref.fused_add_rms_norm(x, residual, weight, 1e-6)
    ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    # The sum is rounded to dtype once, in both: the stored residual matches to the last bit.
    assert_close(residual, expected_residual, dtype)
    assert_close(x, expected_out, dtype, REDUCTION_TOLERANCES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_strided(device, dtype):
    x = strided_rows(21, (576,), dtype, device)
    residual = strided_rows(21, (576,), dtype, device, pad=64)
    weight = torch.randn(576, dtype=dtype, device=device)
    expected_out, expected_residual = ref.fused_add_rms_norm(x, residual, weight, 1e-5)
    ops.fused_add_rms_norm(x, residual, weight, 1e-5)
    assert_close(residual, expected_residual, dtype)
    assert_close(x, expected_out, dtype, REDUCTION_TOLERANCES)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_add_rms_norm_rounds_residual_first(device):
    """In bfloat16 the norm reads the residual as stored (rounded), as vLLM does."""
    x = torch.randn(4, 256, device=device).bfloat16()
    residual = torch.randn(4, 256, device=device).bfloat16()
    weight = torch.ones(256, dtype=torch.bfloat16, device=device)
    rounded = (x.float() + residual.float()).bfloat16()
    expected = ref.rms_norm(rounded, weight, 1e-6)
    ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(residual, rounded)
    assert_close(x, expected, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda d: (
                torch.empty(4, 64, device=d),
                torch.randn(4, 64, device=d),
                torch.ones(63, device=d),
            ),
            "weight must be",
        ),
        (
            lambda d: (
                torch.empty(4, 64, device=d),
                torch.randn(4, 64, device=d),
                torch.ones(64, device=d, dtype=torch.bfloat16),
            ),
            "one dtype",
        ),
        (
            lambda d: (
                torch.empty(4, 64, device=d, dtype=torch.float64),
                torch.randn(4, 64, device=d),
                torch.ones(64, device=d),
            ),
            "one dtype",
        ),
        (
            lambda d: (
                torch.empty(4, 32, device=d),
                torch.randn(4, 64, device=d),
                torch.ones(64, device=d),
            ),
            "shape",
        ),
        (
            lambda d: (
                torch.empty(2, 2, 2, 8, device=d),
                torch.randn(2, 2, 2, 8, device=d),
                torch.ones(8, device=d),
            ),
            "1 to 3 dims",
        ),
        (
            lambda d: (
                torch.empty(4, 64, device=d),
                torch.randn(64, 4, device=d).t(),
                torch.ones(64, device=d),
            ),
            "contiguous last dim",
        ),
        (
            lambda d: (
                torch.empty(4, 64, device=d, dtype=torch.int32),
                torch.randn(4, 64, device=d).int(),
                torch.ones(64, device=d).int(),
            ),
            "float",
        ),
    ],
)
def test_rms_norm_rejects(device, make, message):
    out, x, weight = make(device)
    with pytest.raises(RuntimeError, match=message):
        ops.rms_norm(out, x, weight, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_add_rms_norm_rejects(device):
    x = torch.randn(4, 64, device=device)
    with pytest.raises(RuntimeError, match="alias"):
        ops.fused_add_rms_norm(x, x, torch.ones(64, device=device), 1e-6)
    with pytest.raises(RuntimeError, match="residual must have"):
        ops.fused_add_rms_norm(
            x, torch.randn(5, 64, device=device), torch.ones(64, device=device), 1e-6
        )
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.fused_add_rms_norm(
            x, torch.randn(4, 64, device=device).half(), torch.ones(64, device=device), 1e-6
        )
