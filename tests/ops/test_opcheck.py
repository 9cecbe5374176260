"""torch.library.opcheck on every pnl op: schema (declared mutations), autograd registration, fake
(meta) kernels, and tracing through AOT autograd with dynamic shapes."""

from __future__ import annotations

import professional_nano_llm.ops  # noqa: F401  (registers torch.ops.pnl and the fake kernels)
import pytest
import torch
from ops_testing import DEVICES, paged_kv
from test_decoder_layer import make_layer


def cases(device):
    """(op, args) with small valid inputs, one per op."""
    torch.manual_seed(0)
    f32 = dict(device=device, dtype=torch.float32)
    k_cache, v_cache, block_tables, lens = paged_kv([5, 12], 2, 32, 8, torch.float32, device)
    key = torch.randn(4, 2, 32, **f32)
    slots = torch.tensor([0, 9, -1, 17], dtype=torch.int32, device=device)
    query = torch.randn(7, 4, 32, **f32)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    x = torch.randn(5, 96, **f32)
    positions = torch.tensor([0, 3, 7, 2, 9], device=device)
    return {
        "store_kv_cache": (key, key.clone(), k_cache.clone(), v_cache.clone(), slots),
        "paged_attention_prefill": (
            torch.empty_like(query),
            query,
            k_cache,
            v_cache,
            cu,
            lens,
            block_tables,
            0.2,
        ),
        "paged_attention_decode": (
            torch.empty_like(query[:2]),
            query[:2],
            k_cache,
            v_cache,
            lens,
            block_tables,
            0.2,
        ),
        "rms_norm": (torch.empty_like(x), x, torch.randn(96, **f32), 1e-6),
        "fused_add_rms_norm": (x.clone(), torch.randn_like(x), torch.randn(96, **f32), 1e-6),
        "rotary_embedding": (
            positions,
            torch.randn(5, 3 * 32, **f32),
            torch.randn(5, 32, **f32),
            torch.randn(16, 32, **f32),
            32,
        ),
        "qk_norm_rope_store": (
            positions[:4],
            torch.randn(4, 3, 32, **f32),
            key.clone(),
            key.clone(),
            torch.randn(32, **f32),
            torch.randn(32, **f32),
            1e-6,
            torch.randn(16, 32, **f32),
            k_cache.clone(),
            v_cache.clone(),
            slots,
        ),
        "silu_and_mul": (torch.empty(5, 48, **f32), x),
        "sample_tokens": (
            torch.empty(5, dtype=torch.int64, device=device),
            x,
            torch.tensor([0.0, 0.5, 1.0, 2.0, 1.0], device=device),
            torch.arange(5, device=device),
            torch.arange(5, device=device) * 3,
        ),
        "linear": (
            torch.empty(5, 32, **f32),
            x,
            torch.randn(2, 96, 16, **f32),
            torch.randn(32, **f32),
        ),
        "decoder_layer": tuple(make_layer("qwen2", 4, 2, 32, [9], [(21, 5)], 8, torch.float32, device).values()),
    }


OPS = list(cases("cpu"))
# All four of opcheck's checks apply: every op only mutates what its schema marks (a!), has no
# autograd formula (inputs never require grad in inference), and its fake kernel is a no-op
# (decoder_layer's returns an empty [T, hidden_size]).
TEST_UTILS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
def test_opcheck(device, name):
    torch.library.opcheck(
        getattr(torch.ops.pnl, name).default, cases(device)[name], test_utils=TEST_UTILS
    )
