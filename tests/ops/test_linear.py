"""Linear layers on prepacked (oneDNN) weights against F.linear on the plain weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ops_testing import TOLERANCES

from professional_nano_llm.layers.linear import Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_prepacked_linear_matches_f_linear(dtype, rows, bias):
    layer = Linear(96, 200, bias, dtype)
    torch.nn.init.normal_(layer.weight)
    if bias:
        torch.nn.init.normal_(layer.bias)
    weight, b = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
    x = torch.randn(rows, 96, dtype=dtype)
    layer.prepack()
    layer.prepack()  # idempotent
    assert layer.weight.is_mkldnn  # the packed path runs (torch's x86 CPU builds have oneDNN)
    expected = F.linear(x.double(), weight.double(), None if b is None else b.double())
    tolerance = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(layer(x).double(), expected, **tolerance)
