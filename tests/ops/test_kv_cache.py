"""store_kv_cache against ops.ref: exact copies, -1 slots skipped, strided inputs, bad arguments."""

from __future__ import annotations

import pytest
import torch
from ops_testing import DEVICES, strided_rows
from professional_nano_llm import ops
from professional_nano_llm.ops import ref


def caches(num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
    k_cache = torch.randn(
        num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
    )
    return k_cache, torch.randn_like(k_cache)


def random_slots(num_tokens, num_slots, device, skip_every=0):
    slots = torch.randperm(num_slots)[:num_tokens].to(torch.int32)
    if skip_every:
        slots[::skip_every] = -1
    return slots.to(device)


def assert_store_matches_ref(key, value, k_cache, v_cache, slots):
    """The op writes exactly what the reference writes (the stored values are copies: exact)."""
    k_expected, v_expected = ref.store_kv_cache(key, value, k_cache, v_cache, slots)
    ops.store_kv_cache(key, value, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, k_expected, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, v_expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    ("num_tokens", "num_kv_heads", "head_dim", "block_size"),
    [(1, 1, 64, 16), (7, 3, 64, 8), (83, 2, 80, 16), (300, 8, 128, 256), (33, 1, 256, 8)],
)
def test_store_kv_cache(device, dtype, num_tokens, num_kv_heads, head_dim, block_size):
    num_blocks = -(-num_tokens // block_size) + 2
    k_cache, v_cache = caches(num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
    value = torch.randn_like(key)
    slots = random_slots(num_tokens, num_blocks * block_size, device, skip_every=5)
    assert_store_matches_ref(key, value, k_cache, v_cache, slots)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_cache_strided_slices_of_qkv(device, dtype):
    """key and value as the model passes them: [T, Hkv, D] views of a fused qkv output."""
    T, H, Hkv, D, block_size = 37, 9, 3, 64, 16
    qkv = torch.randn(T, (H + 2 * Hkv) * D, dtype=dtype, device=device)
    key = qkv[:, H * D : (H + Hkv) * D].view(T, Hkv, D)
    value = qkv[:, (H + Hkv) * D :].view(T, Hkv, D)
    k_cache, v_cache = caches(5, block_size, Hkv, D, dtype, device)
    slots = random_slots(T, 5 * block_size, device)
    assert_store_matches_ref(key, value, k_cache, v_cache, slots)


@pytest.mark.parametrize("device", DEVICES)
def test_store_kv_cache_strided_heads(device):
    """Heads need not be adjacent either: only the last dim must be contiguous."""
    key = strided_rows(12, (4, 2, 32), torch.float32, device)[
        :, :, 0, :
    ]  # [12, 4, 32], head stride 64
    value = strided_rows(12, (4, 32), torch.float32, device)
    k_cache, v_cache = caches(3, 8, 4, 32, torch.float32, device)
    slots = random_slots(12, 24, device, skip_every=4)
    assert_store_matches_ref(key, value, k_cache, v_cache, slots)


@pytest.mark.parametrize("device", DEVICES)
def test_store_kv_cache_all_skipped_and_empty(device):
    k_cache, v_cache = caches(2, 16, 2, 64, torch.float32, device)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    key = torch.randn(5, 2, 64, device=device)
    ops.store_kv_cache(
        key, key, k_cache, v_cache, torch.full((5,), -1, dtype=torch.int32, device=device)
    )
    empty = torch.empty(0, 2, 64, device=device)
    ops.store_kv_cache(
        empty, empty, k_cache, v_cache, torch.empty(0, dtype=torch.int32, device=device)
    )
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)


def bad_store_args(device):
    """Valid arguments, to break one at a time."""
    key = torch.randn(4, 2, 64, device=device)
    k_cache, v_cache = caches(2, 16, 2, 64, torch.float32, device)
    return dict(
        key=key,
        value=key.clone(),
        k_cache=k_cache,
        v_cache=v_cache,
        slot_mapping=torch.arange(4, dtype=torch.int32, device=device),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(slot_mapping=torch.arange(4)), "int32"),
        (dict(slot_mapping=torch.arange(3, dtype=torch.int32)), "one slot per token"),
        (dict(value=torch.randn(4, 2, 64, dtype=torch.float64)), "one dtype"),
        (dict(k_cache=torch.randn(2, 16, 2, 64, dtype=torch.bfloat16)), "one dtype"),
        (
            dict(k_cache=torch.randn(2, 16, 3, 64), v_cache=torch.randn(2, 16, 3, 64)),
            "does not fit",
        ),
        (dict(v_cache=torch.randn(2, 16, 2, 32)), "shape"),
        (dict(key=torch.randn(4, 64, 2).transpose(1, 2)), "contiguous last dim"),
        (dict(k_cache=torch.randn(2, 2, 16, 64).transpose(1, 2)), "contiguous"),
    ],
)
def test_store_kv_cache_rejects(device, change, message):
    args = bad_store_args(device)
    args.update({name: t.to(device) for name, t in change.items()})
    with pytest.raises(RuntimeError, match=message):
        ops.store_kv_cache(**args)


@pytest.mark.parametrize("slots", [[0, 1, 32, 3], [0, -2, 2, 3]])
def test_store_kv_cache_rejects_slots_out_of_range_on_cpu(slots):
    """CPU only: the CUDA op never reads slot_mapping on the host (test_elementwise_cuda.py)."""
    args = bad_store_args("cpu")
    args["slot_mapping"] = torch.tensor(slots, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.store_kv_cache(**args)


@pytest.mark.cuda
def test_store_kv_cache_rejects_mixed_devices():
    args = bad_store_args("cuda")
    args["slot_mapping"] = args["slot_mapping"].cpu()
    with pytest.raises(RuntimeError, match="one device"):
        ops.store_kv_cache(**args)
