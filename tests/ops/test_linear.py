"""pnl.linear over packed weights against a float64 F.linear, and the Linear layer that uses it
(pnl.linear for float32, oneDNN's prepacked weights for bfloat16)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ops_testing import DEVICES, TOLERANCES, poisoned, strided_rows

from professional_nano_llm import ops
from professional_nano_llm.layers import linear as linear_module
from professional_nano_llm.layers.linear import Linear, linear
from professional_nano_llm.ops import ref

# A sum over K: float32 errors grow with K, the half types are rounded once at the end.
LINEAR_TOLERANCES = {**TOLERANCES, torch.float32: dict(atol=1e-4, rtol=1e-5)}


def oracle(x, packed, bias):
    return ref.linear(x.double(), packed.double(), None if bias is None else bias.double())


# rows: each instruction set's few-row tiles (1, 2-4) and tall tiles split into every height (5-17),
# 257+ more than one row chunk; out_features: whole panels of 1, 2, 3 and 4 blocks and tails of them.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "rows,out_features,in_features",
    [(1, 64, 96), (1, 80, 33), (2, 48, 17), (3, 80, 1), (4, 16, 576), (5, 176, 40), (6, 32, 12), (7, 48, 33),
     (8, 96, 64), (9, 48, 20), (13, 960, 576), (17, 64, 9), (64, 112, 1536), (257, 32, 8), (600, 208, 24)],
)
@pytest.mark.parametrize("bias", [False, True])
def test_linear(device, dtype, rows, out_features, in_features, bias):
    torch.manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, dtype=dtype, device=device)
    packed = ops.pack_linear_weight(torch.randn(out_features, in_features, dtype=dtype, device=device))
    b = torch.randn(out_features, dtype=dtype, device=device) if bias else None
    out = poisoned(rows, out_features, dtype=dtype, device=device)
    ops.linear(out, x, packed, b)
    torch.testing.assert_close(out.double(), oracle(x, packed, b), **LINEAR_TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_linear_strided_rows(device):
    """Input and output rows may be strided (slices of a wider projection)."""
    x = strided_rows(9, (40,), torch.float32, device)
    packed = ops.pack_linear_weight(torch.randn(48, 40, device=device))
    base = poisoned(9, 48 + 5, dtype=torch.float32, device=device)
    out = base[:, 5:]
    ops.linear(out, x, packed, None)
    torch.testing.assert_close(out.double(), oracle(x, packed, None), **LINEAR_TOLERANCES[torch.float32])
    assert base[:, :5].isnan().all()  # nothing written outside out


def test_pack_layout():
    """Block b, row k, lane l of the packed weight is W[16 b + l, k]."""
    weight = torch.arange(32 * 3, dtype=torch.float32).view(32, 3)
    packed = ops.pack_linear_weight(weight)
    assert packed.shape == (2, 3, 16) and packed.is_contiguous()
    for b, k, lane in [(0, 0, 0), (0, 2, 15), (1, 1, 3), (1, 2, 15)]:
        assert packed[b, k, lane] == weight[16 * b + lane, k]
    with pytest.raises(ValueError, match="divisible by 16"):
        ops.pack_linear_weight(torch.zeros(20, 3))


@pytest.mark.parametrize(
    "x_shape,w_shape,out_shape,bias_shape,message",
    [
        ((4, 8), (2, 9, 16), (4, 32), None, "do not fit"),
        ((4, 8), (2, 8, 16), (4, 48), None, "do not fit"),
        ((4, 8), (2, 8, 16), (3, 32), None, "do not fit"),
        ((4, 8), (32, 8), (4, 32), None, "packed weight"),
        ((4, 8), (2, 8, 16), (4, 32), (16,), "bias must be"),
        ((2, 4, 8), (2, 8, 16), (2, 4, 32), None, "needs input"),
        ((8, 0), (2, 0, 16), (8, 32), None, "in_features K > 0"),  # divided by K once (SIGFPE)
    ],
)
def test_linear_rejects(x_shape, w_shape, out_shape, bias_shape, message):
    args = [torch.zeros(out_shape), torch.zeros(x_shape), torch.zeros(w_shape)]
    with pytest.raises(RuntimeError, match=message):
        ops.linear(*args, None if bias_shape is None else torch.zeros(bias_shape))


def test_linear_rejects_mixed_dtypes():
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.linear(torch.zeros(4, 32), torch.zeros(4, 8), torch.zeros(2, 8, 16, dtype=torch.float64), None)


# bfloat16 goes to oneDNN where it has a bf16 path on this CPU (AVX-512 BW/VL/DQ), else to pnl.linear.
ONEDNN_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
LAYOUTS = [(torch.float32, "packed"), (torch.bfloat16, "packed")]
LAYOUTS += [(torch.bfloat16, "onednn")] if ONEDNN_BF16 else []


@pytest.mark.parametrize("dtype, layout", LAYOUTS)
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_prepacked_linear_layer(dtype, layout, rows, bias, monkeypatch):
    monkeypatch.setattr(linear_module, "_ONEDNN_BF16_LINEAR", layout == "onednn")
    layer = Linear(96, 208, bias, dtype)
    torch.nn.init.normal_(layer.weight)
    if bias:
        torch.nn.init.normal_(layer.bias)
    weight, b = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
    x = torch.randn(2, rows, 96, dtype=dtype)  # leading dims are flattened and restored
    layer.prepack()
    layer.prepack()  # idempotent
    if layout == "packed":
        assert layer.weight.shape == (13, 96, 16)  # pnl.linear runs
    else:
        assert layer.weight.is_mkldnn
    expected = F.linear(x.double(), weight.double(), None if b is None else b.double())
    torch.testing.assert_close(layer(x).double(), expected, **LINEAR_TOLERANCES[dtype])


def test_unpackable_weight_keeps_f_linear():
    """out_features not a multiple of 16 stays plain (no supported model has one) and still works."""
    layer = Linear(8, 20, True, torch.float32)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(3, 8)
    expected = F.linear(x, layer.weight, layer.bias)
    layer.prepack()
    assert layer.weight.shape == (20, 8)
    torch.testing.assert_close(linear(x, layer.weight, layer.bias), expected)


def test_pack_strided_weight():
    """A non-contiguous [N, K] weight (a transposed view) packs like its contiguous copy."""
    weight = torch.randn(24, 32).t()  # [32, 24], strides (1, 32)
    assert torch.equal(ops.pack_linear_weight(weight), ops.pack_linear_weight(weight.contiguous()))
