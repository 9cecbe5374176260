"""CUDA-only checks of rms_norm, fused_add_rms_norm, rotary_embedding, store_kv_cache and
qk_norm_rope_store, beyond the shared tests that already run on cuda through DEVICES: fresh random
inputs, NaN-poisoned outputs, large shapes, unaligned or strided inputs that force the scalar path,
float64 oracles, bitwise reproducibility, out-of-range indices handled on the device (the CUDA ops
never read index tensors on the host), no host sync, and CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch
from ops_testing import REDUCTION_TOLERANCES, TOLERANCES, poisoned
from professional_nano_llm import ops
from professional_nano_llm.ops import ref
from test_qk_norm_rope_store import FUSED_TOLERANCES, make_args
from test_rotary import cos_sin_cache

pytestmark = pytest.mark.cuda

EPS = 1e-6


def assert_close_nan(actual, expected, dtype, table=TOLERANCES):
    """Like ops_testing.assert_close, where NaN in expected (a poisoned element the op must not
    write) must be NaN in actual too."""
    torch.testing.assert_close(actual.to(expected.dtype), expected, equal_nan=True, **table[dtype])


def unaligned_rows(rows, width, dtype, fill=None):
    """[rows, width] whose rows start one element off 16 bytes (row stride width + 1)."""
    base = torch.randn(rows, width + 1, dtype=dtype, device="cuda")
    if fill is not None:
        base.fill_(fill)
    view = base[:, 1:]
    assert view.data_ptr() % 16 != 0
    return view


def twice(fn, make):
    """Runs fn on two fresh copies of the same inputs; returns both results."""
    return fn(*make()), fn(*make())


# rms_norm ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("rows", "hidden"), [(8192, 4096), (4096, 8192), (3, 100_000), (50_000, 128)]
)
def test_rms_norm_large_vs_float64(dtype, rows, hidden):
    x = torch.randn(rows, hidden, dtype=dtype, device="cuda")
    weight = torch.randn(hidden, dtype=dtype, device="cuda")
    out = poisoned(rows, hidden, dtype=dtype, device="cuda")
    ops.rms_norm(out, x, weight, EPS)
    assert_close_nan(out, ref.rms_norm(x.double(), weight.double(), EPS), dtype, REDUCTION_TOLERANCES)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [64, 128, 769, 4096, 5000])
def test_rms_norm_scalar_path(dtype, hidden):
    """Rows one element off 16 bytes, in and out: every size takes the scalar path."""
    x = unaligned_rows(257, hidden, dtype)
    weight = torch.randn(hidden, dtype=dtype, device="cuda")
    out = unaligned_rows(257, hidden, dtype, fill=float("nan"))
    ops.rms_norm(out, x, weight, EPS)
    assert_close_nan(out, ref.rms_norm(x.double(), weight.double(), EPS), dtype, REDUCTION_TOLERANCES)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("T", "H", "D"), [(1000, 40, 128), (77, 8, 64), (33, 3, 256)])
def test_rms_norm_heads_in_place(dtype, T, H, D):
    """Qwen3's per-head q/k norm on a strided [T, H, D] view of qkv, in place."""
    qkv = torch.randn(T, (H + 2) * D, dtype=dtype, device="cuda")
    q = qkv[:, : H * D].view(T, H, D)
    weight = torch.randn(D, dtype=dtype, device="cuda")
    expected = ref.rms_norm(q.double(), weight.double(), EPS)
    tail = qkv[:, H * D :].clone()
    ops.rms_norm(q, q, weight, EPS)
    assert_close_nan(q, expected, dtype, REDUCTION_TOLERANCES)
    assert torch.equal(qkv[:, H * D :], tail)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_is_reproducible(dtype):
    x = torch.randn(4096, 4096, dtype=dtype, device="cuda")
    weight = torch.randn(4096, dtype=dtype, device="cuda")

    def run():
        out = poisoned(4096, 4096, dtype=dtype, device="cuda")
        ops.rms_norm(out, x, weight, EPS)
        return out

    assert torch.equal(run(), run())


# fused_add_rms_norm --------------------------------------------------------------------------------


def check_fused_add(x, residual, weight, dtype):
    rounded = (x.float() + residual.float()).to(dtype) if dtype != torch.float64 else x + residual
    expected = ref.rms_norm(rounded.double(), weight.double(), EPS)
    ops.fused_add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(residual, rounded)  # the sum is rounded once, in both: the same bits
    assert_close_nan(x, expected, dtype, REDUCTION_TOLERANCES)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize(("rows", "hidden"), [(8192, 4096), (50_000, 128), (5, 20_000)])
def test_fused_add_rms_norm_large_vs_float64(dtype, rows, hidden):
    x = torch.randn(rows, hidden, dtype=dtype, device="cuda")
    residual = torch.randn_like(x)
    check_fused_add(x, residual, torch.randn(hidden, dtype=dtype, device="cuda"), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [96, 769, 4096])
def test_fused_add_rms_norm_scalar_path(dtype, hidden):
    x = unaligned_rows(301, hidden, dtype)
    residual = unaligned_rows(301, hidden, dtype)
    check_fused_add(x, residual, torch.randn(hidden, dtype=dtype, device="cuda"), dtype)


def test_fused_add_rms_norm_is_reproducible():
    x0 = torch.randn(2048, 4096, dtype=torch.bfloat16, device="cuda")
    r0 = torch.randn_like(x0)
    weight = torch.randn(4096, dtype=torch.bfloat16, device="cuda")

    def run(x, r):
        ops.fused_add_rms_norm(x, r, weight, EPS)
        return x, r

    (xa, ra), (xb, rb) = twice(run, lambda: (x0.clone(), r0.clone()))
    assert torch.equal(xa, xb) and torch.equal(ra, rb)


# rotary_embedding ----------------------------------------------------------------------------------


def rotary_inputs(T, H, Hkv, D, rot_dim, dtype, cache_dtype, pad=0, positions_dtype=torch.int64):
    qkv = torch.randn(T, pad + (H + 2 * Hkv) * D, dtype=dtype, device="cuda")[:, pad:]
    q = qkv[:, : H * D].view(T, H, D)
    k = qkv[:, H * D : (H + Hkv) * D].view(T, Hkv, D)
    positions = torch.randint(0, 8192, (T,), dtype=positions_dtype, device="cuda")
    return positions, q, k, cos_sin_cache(8192, rot_dim, cache_dtype, "cuda")


def check_rotary(positions, q, k, cache, dtype, head_size):
    expected_q, expected_k = ref.rotary_embedding(positions, q.double(), k.double(), cache.double(), head_size)
    ops.rotary_embedding(positions, q, k, cache, head_size)
    assert_close_nan(q, expected_q, dtype)
    assert_close_nan(k, expected_k, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("cache_dtype", [torch.float32, "same"])
@pytest.mark.parametrize(("D", "rot_dim"), [(128, 128), (128, 64), (64, 64), (256, 256)])
def test_rotary_embedding_large_vs_float64(dtype, cache_dtype, D, rot_dim):
    cache_dtype = dtype if cache_dtype == "same" else cache_dtype
    check_rotary(*rotary_inputs(4096, 32, 8, D, rot_dim, dtype, cache_dtype), dtype, D)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("D", "rot_dim", "pad"), [(128, 128, 1), (80, 40, 0), (96, 96, 3)])
def test_rotary_embedding_scalar_path(dtype, D, rot_dim, pad):
    """Rows off 16 bytes (pad), or half = 20 not a whole number of 16-byte vectors."""
    check_rotary(*rotary_inputs(517, 12, 4, D, rot_dim, dtype, torch.float32, pad, torch.int32), dtype, D)


def test_rotary_embedding_2d_layout():
    positions, q, k, cache = rotary_inputs(300, 16, 4, 128, 128, torch.bfloat16, torch.bfloat16)
    q2, k2 = q.reshape(300, -1), k.reshape(300, -1)
    check_rotary(positions, q2, k2, cache, torch.bfloat16, 128)  # [T, H * D] rows


def test_rotary_embedding_position_out_of_range_leaves_token():
    """Not checked on the host (a sync): the token is left unrotated, nothing is read past the cache."""
    positions, q, k, cache = rotary_inputs(64, 8, 2, 128, 128, torch.float32, torch.float32)
    positions[5], positions[9], positions[17] = -1, 8192, 1 << 40
    bad = torch.zeros(64, dtype=torch.bool, device="cuda")
    bad[[5, 9, 17]] = True
    q_before, k_before = q.clone(), k.clone()
    expected_q, expected_k = ref.rotary_embedding(
        positions.clamp(0, 8191), q.double(), k.double(), cache.double(), 128
    )
    ops.rotary_embedding(positions, q, k, cache, 128)
    torch.cuda.synchronize()
    assert torch.equal(q[bad], q_before[bad]) and torch.equal(k[bad], k_before[bad])
    assert_close_nan(q[~bad], expected_q[~bad], torch.float32)
    assert_close_nan(k[~bad], expected_k[~bad], torch.float32)


def test_rotary_embedding_is_reproducible():
    positions, q0, k0, cache = rotary_inputs(2048, 32, 8, 128, 128, torch.bfloat16, torch.float32)

    def run(q, k):
        ops.rotary_embedding(positions, q, k, cache, 128)
        return q, k

    (qa, ka), (qb, kb) = twice(run, lambda: (q0.clone(), k0.clone()))
    assert torch.equal(qa, qb) and torch.equal(ka, kb)


# store_kv_cache ------------------------------------------------------------------------------------


def store_inputs(T, Hkv, D, block_size, dtype, pad=0, skip_every=5):
    qkv = torch.randn(T, pad + 4 * Hkv * D, dtype=dtype, device="cuda")[:, pad:]
    key = qkv[:, 2 * Hkv * D : 3 * Hkv * D].view(T, Hkv, D)
    value = qkv[:, 3 * Hkv * D :].view(T, Hkv, D)
    num_blocks = -(-T // block_size) + 3
    k_cache = poisoned(num_blocks, block_size, Hkv, D, dtype=dtype, device="cuda")
    v_cache = poisoned(num_blocks, block_size, Hkv, D, dtype=dtype, device="cuda")
    slots = torch.randperm(num_blocks * block_size)[:T].to(torch.int32)
    if skip_every:
        slots[::skip_every] = -1
    return key, value, k_cache, v_cache, slots.cuda()


def check_store(key, value, k_cache, v_cache, slots):
    k_expected, v_expected = ref.store_kv_cache(key, value, k_cache, v_cache, slots)
    ops.store_kv_cache(key, value, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, k_expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize(("Hkv", "D", "block_size"), [(8, 128, 16), (1, 64, 8), (4, 256, 256)])
def test_store_kv_cache_large_poisoned(dtype, Hkv, D, block_size):
    check_store(*store_inputs(8192, Hkv, D, block_size, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("D", "pad"), [(128, 1), (72, 0), (36, 2)])
def test_store_kv_cache_scalar_path(dtype, D, pad):
    check_store(*store_inputs(1000, 3, D, 16, dtype, pad))


def test_store_kv_cache_slot_out_of_range_is_skipped():
    """Not checked on the host (a sync): a slot past the cache, or below -1, writes nothing."""
    key, value, k_cache, v_cache, slots = store_inputs(100, 2, 64, 16, torch.float32, skip_every=0)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    slots[3], slots[50], slots[99] = num_slots, -7, 1 << 30
    kept = slots.clone()
    kept[[3, 50, 99]] = -1
    k_expected, v_expected = ref.store_kv_cache(key, value, k_cache, v_cache, kept)
    ops.store_kv_cache(key, value, k_cache, v_cache, slots)
    torch.cuda.synchronize()
    torch.testing.assert_close(k_cache, k_expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_expected, rtol=0, atol=0, equal_nan=True)


# qk_norm_rope_store --------------------------------------------------------------------------------


def poison_caches(args):
    args["k_cache"].fill_(float("nan"))
    args["v_cache"].fill_(float("nan"))
    return args


def check_fused(args, dtype):
    expected = ref.qk_norm_rope_store(**args)
    ops.qk_norm_rope_store(**args)
    got = (args["query"], args["key"], args["k_cache"], args["v_cache"])
    for actual, want in zip(got, expected):
        assert_close_nan(actual, want, dtype, FUSED_TOLERANCES)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("H", "Hkv", "D", "rot_dim"), [(32, 8, 128, 128), (16, 2, 64, 64), (8, 8, 256, 128)]
)
def test_qk_norm_rope_store_large_poisoned(dtype, H, Hkv, D, rot_dim):
    _, args = make_args(4096, H, Hkv, D, rot_dim, 16, dtype, "cuda")
    check_fused(poison_caches(args), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qk_norm_rope_store_float64_oracle(dtype):
    """The op in dtype against the whole chain in float64: only dtype rounding apart."""
    _, args = make_args(1024, 16, 4, 128, 128, 16, dtype, "cuda")
    wide = {
        n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
        for n, t in args.items()
    }
    expected = ref.qk_norm_rope_store(**wide)
    ops.qk_norm_rope_store(**args)
    for actual, want in zip((args["query"], args["key"], args["k_cache"], args["v_cache"]), expected):
        assert_close_nan(actual, want, dtype, FUSED_TOLERANCES)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("D", "rot_dim", "pad", "block_size"), [(128, 128, 1, 8), (80, 40, 0, 16), (64, 32, 3, 256)]
)
def test_qk_norm_rope_store_scalar_path(dtype, D, rot_dim, pad, block_size):
    _, args = make_args(777, 12, 4, D, rot_dim, block_size, dtype, "cuda", pad=pad)
    check_fused(poison_caches(args), dtype)


def test_qk_norm_rope_store_out_of_range_indices():
    """Not checked on the host: a bad position leaves its token normed but unrotated, a bad slot
    stores nothing."""
    _, args = make_args(64, 8, 2, 128, 128, 16, torch.float32, "cuda", skip_every=0)
    poison_caches(args)
    num_slots = args["k_cache"].shape[0] * args["k_cache"].shape[1]
    args["positions"][7] = -3
    args["slot_mapping"][11] = num_slots
    ok = dict(args, positions=args["positions"].clone(), slot_mapping=args["slot_mapping"].clone())
    ok["positions"][7] = 0  # position 0 rotates by the identity (cos 1, sin 0)
    ok["slot_mapping"][11] = -1
    expected = ref.qk_norm_rope_store(**ok)
    ops.qk_norm_rope_store(**args)
    torch.cuda.synchronize()
    for actual, want in zip((args["query"], args["key"], args["k_cache"], args["v_cache"]), expected):
        assert_close_nan(actual, want, torch.float32, FUSED_TOLERANCES)


def test_qk_norm_rope_store_is_reproducible():
    _, args = make_args(2048, 32, 8, 128, 128, 16, torch.bfloat16, "cuda")
    originals = {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in args.items()}

    def run():
        fresh = {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in originals.items()}
        ops.qk_norm_rope_store(**fresh)
        return fresh["query"], fresh["key"], fresh["k_cache"], fresh["v_cache"]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# No host sync, CUDA graphs -------------------------------------------------------------------------


def all_op_calls():
    """One call per op on fresh CUDA inputs, as closures (all in-place)."""
    x = torch.randn(64, 512, dtype=torch.bfloat16, device="cuda")
    residual = torch.randn_like(x)
    weight = torch.randn(512, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(x)
    positions, q, k, cache = rotary_inputs(64, 8, 2, 128, 128, torch.bfloat16, torch.float32)
    key, value, k_cache, v_cache, slots = store_inputs(64, 2, 128, 16, torch.bfloat16)
    _, fused = make_args(64, 8, 2, 128, 128, 16, torch.bfloat16, "cuda")
    return [
        lambda: ops.rms_norm(out, x, weight, EPS),
        lambda: ops.fused_add_rms_norm(x, residual, weight, EPS),
        lambda: ops.rotary_embedding(positions, q, k, cache, 128),
        lambda: ops.store_kv_cache(key, value, k_cache, v_cache, slots),
        lambda: ops.qk_norm_rope_store(**fused),
    ], [out, x, residual, q, k, k_cache, v_cache, fused["query"], fused["key"], fused["k_cache"], fused["v_cache"]]


def test_no_host_sync():
    calls, _ = all_op_calls()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for call in calls:
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_cuda_graph_capture_matches_eager():
    torch.manual_seed(1)
    eager_calls, eager_outs = all_op_calls()
    torch.manual_seed(1)
    graph_calls, graph_outs = all_op_calls()
    for call in eager_calls:
        call()
    graph = torch.cuda.CUDAGraph()  # the eager calls above loaded every kernel the capture launches
    with torch.cuda.graph(graph):
        for call in graph_calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager_outs, graph_outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
