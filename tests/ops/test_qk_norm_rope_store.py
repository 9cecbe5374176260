"""qk_norm_rope_store against ops.ref and against the separate ops it fuses: strided q/k/v from one
fused qkv output, partial rotary, block sizes 8/16/256, -1 slots, bad arguments."""

from __future__ import annotations

import pytest
import torch
from ops_testing import DEVICES, REDUCTION_TOLERANCES, assert_close
from professional_nano_llm import ops
from professional_nano_llm.ops import ref
from test_rotary import cos_sin_cache

# The op rounds the normed q/k to dtype before rotating, as the separate ops store it. A sum taken
# in another order can flip that rounding by one ulp of the normed value (|y| < 8 here: weights in
# [0.5, 1.5)), which the rotation carries into outputs of any size: allow it in the half types.
FUSED_TOLERANCES = {
    **REDUCTION_TOLERANCES,
    torch.float16: dict(atol=8e-3, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=1.6e-2),
}


def qkv_views(T, H, Hkv, D, dtype, device, pad=0):
    """q [T, H, D], k and v [T, Hkv, D] as the model gets them: strided views of one qkv output
    (with `pad` extra leading elements, which can break 16-byte alignment)."""
    qkv = torch.randn(T, pad + (H + 2 * Hkv) * D, dtype=dtype, device=device)[:, pad:]
    q = qkv[:, : H * D].view(T, H, D)
    k = qkv[:, H * D : (H + Hkv) * D].view(T, Hkv, D)
    v = qkv[:, (H + Hkv) * D :].view(T, Hkv, D)
    return qkv, q, k, v


def make_args(
    T, H, Hkv, D, rot_dim, block_size, dtype, device,
    cache_dtype=None, positions_dtype=torch.int64, pad=0, skip_every=4,
):
    qkv, q, k, v = qkv_views(T, H, Hkv, D, dtype, device, pad)
    num_blocks = -(-T // block_size) + 2
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, dtype=dtype, device=device)
    slots = torch.randperm(num_blocks * block_size)[:T].to(torch.int32)
    if skip_every:
        slots[::skip_every] = -1
    max_position = 4096
    positions = torch.randint(0, max_position, (T,), dtype=positions_dtype)
    positions[:1] = max_position - 1
    args = dict(
        positions=positions.to(device),
        query=q,
        key=k,
        value=v,
        q_weight=torch.rand(D, dtype=dtype, device=device) + 0.5,
        k_weight=torch.rand(D, dtype=dtype, device=device) + 0.5,
        eps=1e-6,
        cos_sin_cache=cos_sin_cache(max_position, rot_dim, cache_dtype or dtype, device),
        k_cache=k_cache,
        v_cache=torch.randn_like(k_cache),
        slot_mapping=slots.to(device),
    )
    return qkv, args


def unfused(args):
    """The sequence the model ran before the fused op: rms_norm, rotary_embedding, store_kv_cache."""
    q, k = torch.empty_like(args["query"]), torch.empty_like(args["key"])
    ops.rms_norm(q, args["query"], args["q_weight"], args["eps"])
    ops.rms_norm(k, args["key"], args["k_weight"], args["eps"])
    ops.rotary_embedding(args["positions"], q, k, args["cos_sin_cache"], q.shape[-1])
    k_cache, v_cache = args["k_cache"].clone(), args["v_cache"].clone()
    ops.store_kv_cache(k, args["value"], k_cache, v_cache, args["slot_mapping"])
    return q, k, k_cache, v_cache


def check_against_ref_and_unfused(qkv, args, dtype, device):
    H, D = args["query"].shape[1:]
    Hkv = args["key"].shape[1]
    v_before = qkv[:, (H + Hkv) * D :].clone()
    expected = ref.qk_norm_rope_store(**args)
    separate = unfused(args)
    ops.qk_norm_rope_store(**args)
    got = (args["query"], args["key"], args["k_cache"], args["v_cache"])
    for actual, want in zip(got, expected):
        assert_close(actual, want, dtype, FUSED_TOLERANCES)
    if device == "cpu":  # built from the same row helpers: the same bits
        for actual, want in zip(got, separate):
            assert torch.equal(actual, want)
    else:
        for actual, want in zip(got, separate):
            assert_close(actual, want.to(torch.float64), dtype, FUSED_TOLERANCES)
    assert torch.equal(qkv[:, (H + Hkv) * D :], v_before)  # value is read only


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    ("T", "H", "Hkv", "D", "rot_dim", "block_size"),
    [
        (1, 4, 1, 64, 64, 8),
        (7, 8, 2, 128, 128, 16),
        (83, 6, 3, 80, 80, 256),
        (37, 4, 2, 128, 64, 16),  # partial rotary: the tail is normed, not rotated
        (19, 2, 2, 256, 256, 8),
        (13, 5, 1, 40, 40, 16),  # half = 20: no 16-byte pairs in bf16, the CUDA scalar path
    ],
)
def test_qk_norm_rope_store(device, dtype, T, H, Hkv, D, rot_dim, block_size):
    qkv, args = make_args(T, H, Hkv, D, rot_dim, block_size, dtype, device)
    check_against_ref_and_unfused(qkv, args, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_dtype", [torch.float32, "same"])
@pytest.mark.parametrize("positions_dtype", [torch.int32, torch.int64])
def test_qk_norm_rope_store_cache_and_position_types(device, dtype, cache_dtype, positions_dtype):
    qkv, args = make_args(
        29, 8, 2, 128, 128, 16, dtype, device,
        cache_dtype=dtype if cache_dtype == "same" else cache_dtype, positions_dtype=positions_dtype,
    )
    check_against_ref_and_unfused(qkv, args, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_store_unaligned_rows(device, dtype):
    """qkv rows one element off 16 bytes: the CUDA kernel takes its scalar path."""
    qkv, args = make_args(21, 4, 2, 64, 64, 16, dtype, device, pad=1)
    check_against_ref_and_unfused(qkv, args, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
def test_qk_norm_rope_store_all_skipped_and_empty(device):
    _, args = make_args(5, 4, 2, 64, 64, 8, torch.float32, device)
    args["slot_mapping"] = torch.full((5,), -1, dtype=torch.int32, device=device)
    k_before, v_before = args["k_cache"].clone(), args["v_cache"].clone()
    expected_q, expected_k, _, _ = ref.qk_norm_rope_store(**args)
    ops.qk_norm_rope_store(**args)
    assert torch.equal(args["k_cache"], k_before) and torch.equal(args["v_cache"], v_before)
    assert_close(args["query"], expected_q, torch.float32, FUSED_TOLERANCES)
    assert_close(args["key"], expected_k, torch.float32, FUSED_TOLERANCES)

    _, empty = make_args(0, 4, 2, 64, 64, 8, torch.float32, device)
    ops.qk_norm_rope_store(**empty)


def with_strides_on(device, t):
    """t copied to device with its strides kept: Tensor.to makes a slice with gaps contiguous."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).copy_(t)


def bad_args(device):
    """Valid arguments, to break one at a time."""
    return make_args(3, 2, 1, 64, 64, 16, torch.float32, device, skip_every=0)[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(query=torch.randn(3, 2 * 64)), "query must be"),
        (dict(key=torch.randn(3, 64)), "key must be"),
        (dict(query=torch.randn(3, 2, 32)), "key must have head_size 32"),
        (dict(key=torch.randn(3, 1, 64, dtype=torch.float64)), "one dtype"),
        (dict(positions=torch.tensor([0, 1])), "one row per position"),
        (dict(positions=torch.tensor([0.0, 1.0, 2.0])), "int32 or int64"),
        (dict(q_weight=torch.ones(32)), "q_weight must be"),
        (dict(k_weight=torch.ones(64, dtype=torch.float64)), "one dtype"),
        (dict(k_weight=torch.ones(128)[::2]), "k_weight must be contiguous"),
        (dict(cos_sin_cache=torch.randn(64, 66)), "rot_dim"),
        (dict(cos_sin_cache=torch.randn(64, 64, dtype=torch.float64)), "float32 or query's dtype"),
        (dict(value=torch.randn(3, 2, 64)), "value must have key's shape"),
        (dict(k_cache=torch.randn(2, 16, 2, 64), v_cache=torch.randn(2, 16, 2, 64)), "does not fit"),
        (dict(v_cache=torch.randn(2, 16, 1, 32)), "shape"),
        (dict(slot_mapping=torch.arange(3)), "int32"),
        (dict(slot_mapping=torch.arange(2, dtype=torch.int32)), "one slot per token"),
        (dict(query=torch.randn(3, 64, 2).transpose(1, 2)), "contiguous last dim"),
    ],
)
def test_qk_norm_rope_store_rejects(device, change, message):
    args = bad_args(device)
    args.update({name: with_strides_on(device, t) for name, t in change.items()})
    with pytest.raises(RuntimeError, match=message):
        ops.qk_norm_rope_store(**args)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(positions=torch.tensor([0, 1, 4096])), "out of range"),
        (dict(positions=torch.tensor([0, -1, 2], dtype=torch.int32)), "out of range"),
        (dict(slot_mapping=torch.tensor([0, 1, 48], dtype=torch.int32)), "out of range"),
        (dict(slot_mapping=torch.tensor([0, -2, 2], dtype=torch.int32)), "out of range"),
    ],
)
def test_qk_norm_rope_store_rejects_index_out_of_range_on_cpu(change, message):
    """CPU only: the CUDA op never reads index tensors on the host (test_elementwise_cuda.py)."""
    args = bad_args("cpu")
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        ops.qk_norm_rope_store(**args)
