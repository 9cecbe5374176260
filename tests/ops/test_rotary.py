"""rotary_embedding against ops.ref: neox layout, partial rotation, strided q/k, bad arguments."""

from __future__ import annotations

import pytest
import torch
from ops_testing import DEVICES, TOLERANCES, assert_close
from professional_nano_llm import ops
from professional_nano_llm.ops import ref


def cos_sin_cache(max_position, rot_dim, dtype, device, base=10000.0):
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    ("num_tokens", "num_heads", "num_kv_heads", "head_size", "rot_dim"),
    [
        (1, 9, 3, 64, 64),
        (7, 4, 4, 128, 128),
        (83, 16, 2, 80, 80),
        (33, 8, 1, 256, 256),
        (19, 6, 2, 64, 32),
    ],
)
@pytest.mark.parametrize("positions_dtype", [torch.int64, torch.int32])
def test_rotary_embedding(
    device, dtype, num_tokens, num_heads, num_kv_heads, head_size, rot_dim, positions_dtype
):
    max_position = 4096
    positions = torch.randint(0, max_position, (num_tokens,), dtype=positions_dtype, device=device)
    positions[0] = max_position - 1
    query = torch.randn(num_tokens, num_heads * head_size, dtype=dtype, device=device)
    key = torch.randn(num_tokens, num_kv_heads * head_size, dtype=dtype, device=device)
    cache = cos_sin_cache(max_position, rot_dim, dtype, device)
    expected_q, expected_k = ref.rotary_embedding(positions, query, key, cache, head_size)
    ops.rotary_embedding(positions, query, key, cache, head_size)
    assert_close(query, expected_q, dtype)
    assert_close(key, expected_k, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_dtype", [torch.float32, "same"])
def test_rotary_embedding_strided_3d_slices_of_qkv(device, dtype, cache_dtype):
    """q and k as [T, H, D] views of one fused qkv output, rotated in place; v is untouched."""
    T, H, Hkv, D = 29, 9, 3, 64
    qkv = torch.randn(T, (H + 2 * Hkv) * D, dtype=dtype, device=device)
    before = qkv.clone()
    q = qkv[:, : H * D].view(T, H, D)
    k = qkv[:, H * D : (H + Hkv) * D].view(T, Hkv, D)
    positions = torch.arange(T, device=device) * 3
    cache = cos_sin_cache(128, D, dtype if cache_dtype == "same" else cache_dtype, device)
    expected_q, expected_k = ref.rotary_embedding(positions, q, k, cache, D)
    ops.rotary_embedding(positions, q, k, cache, D)
    assert_close(q, expected_q, dtype)
    assert_close(k, expected_k, dtype)
    assert torch.equal(qkv[:, (H + Hkv) * D :], before[:, (H + Hkv) * D :])


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_embedding_partial_leaves_tail(device):
    """With rot_dim < head_size only the first rot_dim dims of each head move."""
    T, H, D, rot_dim = 5, 3, 64, 16
    query = torch.randn(T, H, D, device=device)
    key = torch.randn(T, 1, D, device=device)
    q_before, k_before = query.clone(), key.clone()
    ops.rotary_embedding(
        torch.arange(1, T + 1, device=device),
        query,
        key,
        cos_sin_cache(16, rot_dim, torch.float32, device),
        D,
    )
    assert torch.equal(query[..., rot_dim:], q_before[..., rot_dim:])
    assert torch.equal(key[..., rot_dim:], k_before[..., rot_dim:])
    assert not torch.equal(query[..., :rot_dim], q_before[..., :rot_dim])


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_embedding_position_zero_is_identity(device):
    query = torch.randn(4, 2 * 32, device=device)
    key = torch.randn(4, 32, device=device)
    q_before, k_before = query.clone(), key.clone()
    ops.rotary_embedding(
        torch.zeros(4, dtype=torch.int32, device=device),
        query,
        key,
        cos_sin_cache(8, 32, torch.float32, device),
        32,
    )
    torch.testing.assert_close(query, q_before, **TOLERANCES[torch.float32])
    torch.testing.assert_close(key, k_before, **TOLERANCES[torch.float32])


def valid_rotary_args():
    """Valid arguments, to break one at a time."""
    return dict(
        positions=torch.tensor([0, 1, 2]),
        query=torch.randn(3, 2 * 64),
        key=torch.randn(3, 64),
        cos_sin_cache=torch.randn(64, 64),
        head_size=64,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(positions=torch.tensor([0.0, 1.0, 2.0])), "int32 or int64"),
        (dict(positions=torch.tensor([0, 1])), "one row per position"),
        (dict(query=torch.randn(3, 100)), "not a multiple of head_size"),
        (dict(query=torch.randn(3, 2, 32)), "head_size 64"),
        (dict(key=torch.randn(3, 64, dtype=torch.float64)), "one dtype"),
        (dict(cos_sin_cache=torch.randn(64, 66)), "rot_dim"),
        (dict(cos_sin_cache=torch.randn(64, 63)), "rot_dim"),
        (dict(cos_sin_cache=torch.randn(64, 64, dtype=torch.float64)), "float32 or query's dtype"),
        (dict(query=torch.randn(2 * 64, 3).t()), "contiguous last dim"),
    ],
)
def test_rotary_embedding_rejects(device, change, message):
    args = valid_rotary_args()
    args.update(change)
    args = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in args.items()}
    with pytest.raises(RuntimeError, match=message):
        ops.rotary_embedding(**args)


@pytest.mark.parametrize(
    "positions", [torch.tensor([0, 1, 64]), torch.tensor([0, -1, 2], dtype=torch.int32)]
)
def test_rotary_embedding_rejects_positions_out_of_range_on_cpu(positions):
    """CPU only: the CUDA op never reads positions on the host (test_elementwise_cuda.py)."""
    args = valid_rotary_args()
    args["positions"] = positions
    with pytest.raises(RuntimeError, match="out of range"):
        ops.rotary_embedding(**args)
