"""paged_attention_decode on CUDA beyond the generic tests of test_paged_attention.py: many
partitions, every dtype and kernel variant (head tiles, threads per row, the scalar fallback),
masked keys that must never be read, determinism, and CUDA graph capture with new lengths.

Error rule: the kernel accumulates in float32 (float64 for float64) and rounds once, so each output
element is within one rounding of the float64 reference, plus a little accumulation noise.
"""

from __future__ import annotations

import pytest
import torch
from ops_testing import paged_kv, poisoned, strided_rows
from professional_nano_llm import ops
from professional_nano_llm.ops import ref

pytestmark = pytest.mark.cuda

# (relative, absolute) bound per element: the dtype's unit roundoff doubled, and fp32 noise.
BOUNDS = {
    torch.float64: (0.0, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2.0**-10, 1e-4),
    torch.bfloat16: (2.0**-7, 1e-4),
}
# Around the partition boundaries (512 keys), a single key, and contexts of many partitions.
CONTEXTS = [1, 2, 255, 256, 257, 511, 512, 513, 1025, 4000]
# (num_heads, num_kv_heads, head_dim): MHA, Qwen3-0.6B (GQA 2), GQA 3 (a padded head tile), GQA 8,
# MQA 16 (two head chunks), head_dim 64/256, 72 and 80 (masked lanes), 100 (scalar for half types)
# and 33 (scalar for every dtype).
HEADS = [
    (4, 4, 128),
    (16, 8, 128),
    (9, 3, 64),
    (32, 4, 128),
    (16, 1, 64),
    (4, 2, 256),
    (6, 2, 72),
    (16, 2, 80),
    (4, 1, 100),
    (4, 2, 33),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def poison_unused_cache(k_cache, v_cache, block_tables, context_lens):
    """NaN in every cache slot no context uses (spare blocks, the tails of last blocks): a kernel
    that reads a masked key or value, even to multiply it by zero, returns NaN."""
    block_size = k_cache.shape[1]
    pos = torch.arange(block_tables.shape[1] * block_size, device=k_cache.device)
    valid = pos[None, :] < context_lens[:, None]
    blocks = block_tables[:, pos // block_size][valid].long()
    offsets = (pos % block_size).expand(valid.shape)[valid]
    used = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=k_cache.device)
    used[blocks, offsets] = True
    k_cache[~used] = float("nan")
    v_cache[~used] = float("nan")


def widen(block_tables, width):
    """block_tables padded with -1 to `width` columns (a CUDA graph's table of max_model_len)."""
    pad = torch.full(
        (block_tables.shape[0], width - block_tables.shape[1]),
        -1,
        dtype=block_tables.dtype,
        device=block_tables.device,
    )
    return torch.cat([block_tables, pad], dim=1)


def check(out, query, k_cache, v_cache, context_lens, block_tables, scale, bounds=None):
    exact = ref.paged_attention_decode(
        query.double(), k_cache.double(), v_cache.double(), context_lens, block_tables, scale
    )
    assert not out.isnan().any(), "an output element was not written (or a masked key was read)"
    rel, abs_ = bounds or BOUNDS[query.dtype]
    err = (out.double() - exact).abs()
    bound = rel * exact.abs() + abs_
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"max error {err.max().item():.3g}; worst element {worst.item()} off by "
        f"{err.flatten()[worst].item():.3g} (bound {bound.flatten()[worst].item():.3g})"
    )


def decode_inputs(context_lens, heads, block_size, dtype, strided=False, table_width=None):
    num_heads, num_kv_heads, head_dim = heads
    k_cache, v_cache, block_tables, lens = paged_kv(
        context_lens, num_kv_heads, head_dim, block_size, dtype, "cuda"
    )
    poison_unused_cache(k_cache, v_cache, block_tables, lens)
    if table_width is not None:
        block_tables = widen(block_tables, table_width)
    S = len(context_lens)
    if strided:  # q as a slice of a fused qkv output
        pad = 2 * num_kv_heads * head_dim
        query = strided_rows(S, (num_heads, head_dim), dtype, "cuda", pad=pad)
    else:
        query = torch.randn(S, num_heads, head_dim, dtype=dtype, device="cuda")
    return query, k_cache, v_cache, lens, block_tables


def run(query, k_cache, v_cache, lens, block_tables, scale, out=None):
    if out is None:
        out = poisoned(*query.shape, dtype=query.dtype, device="cuda")
    ops.paged_attention_decode(out, query, k_cache, v_cache, lens, block_tables, scale)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
def test_decode_cuda(dtype, heads):
    args = decode_inputs(CONTEXTS, heads, 16, dtype)
    scale = heads[2] ** -0.5
    check(run(*args, scale), *args, scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 256])
@pytest.mark.parametrize("heads", [(16, 8, 128), (32, 4, 64), (4, 2, 33)])
def test_decode_cuda_block_sizes(dtype, block_size, heads):
    args = decode_inputs(CONTEXTS, heads, block_size, dtype)
    scale = heads[2] ** -0.5
    check(run(*args, scale), *args, scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_cuda_wide_table(dtype):
    """A table for 40960 tokens (2560-key partitions, most CTAs past every context): contexts
    around that partition size, one of many partitions, and the whole table."""
    heads = (16, 8, 128)
    args = decode_inputs([1, 2560, 2561, 9000, 40960], heads, 16, dtype, table_width=2560)
    scale = heads[2] ** -0.5
    check(run(*args, scale), *args, scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_decode_cuda_strided_query_and_out(dtype):
    heads = (16, 8, 128)
    query, k_cache, v_cache, lens, tables = decode_inputs(CONTEXTS, heads, 16, dtype, strided=True)
    out = torch.full((len(CONTEXTS), 16 * 128 + 5), float("nan"), dtype=dtype, device="cuda")
    out = out[:, 5:].view(len(CONTEXTS), 16, 128)
    scale = 128**-0.5
    run(query, k_cache, v_cache, lens, tables, scale, out=out)
    check(out, query, k_cache, v_cache, lens, tables, scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_cuda_unaligned_cache(dtype):
    """Caches that start off a 16-byte boundary take the scalar kernel, even at head_dim 128."""
    heads = (16, 8, 128)
    query, k_cache, v_cache, lens, tables = decode_inputs([1, 700, 3000], heads, 16, dtype)

    def shifted(cache):
        flat = torch.empty(cache.numel() + 1, dtype=dtype, device="cuda")
        view = flat[1:].view(cache.shape)
        view.copy_(cache)
        assert view.is_contiguous() and view.data_ptr() % 16 != 0
        return view

    k_cache, v_cache = shifted(k_cache), shifted(v_cache)
    scale = 128**-0.5
    out = run(query, k_cache, v_cache, lens, tables, scale)
    check(out, query, k_cache, v_cache, lens, tables, scale)


def test_decode_cuda_large_scores():
    """Scores in the hundreds: the running max must be subtracted before every exponential."""
    heads = (8, 2, 64)
    query, k_cache, v_cache, lens, tables = decode_inputs([3, 600, 2000], heads, 16, torch.float32)
    query *= 10
    out = run(query, k_cache, v_cache, lens, tables, 3.0)
    # Scores near 1000 carry fp32 rounding of ~1e-4 into the exponentials (torch's own error too).
    check(out, query, k_cache, v_cache, lens, tables, 3.0, bounds=(1e-3, 1e-3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_cuda_deterministic_and_batch_invariant(dtype):
    """Bitwise the same output when run again, and for a sequence batched with other ones (the
    plan depends on the table width only, and nothing is accumulated in a racy order)."""
    heads = (16, 8, 128)
    contexts = [4000, 1, 513, 2048, 300, 1025]
    query, k_cache, v_cache, lens, tables = decode_inputs(contexts, heads, 16, dtype)
    scale = 128**-0.5
    first = run(query, k_cache, v_cache, lens, tables, scale)
    for _ in range(3):
        assert torch.equal(run(query, k_cache, v_cache, lens, tables, scale), first)
    for keep in ([0], [3, 0], [5, 2, 0, 4]):
        idx = torch.tensor(keep, device="cuda")
        part = run(query[idx], k_cache, v_cache, lens[idx], tables[idx], scale)
        assert torch.equal(part, first[idx])


def test_decode_cuda_graph_replay():
    """Captured once for a batch of 8 and a table of 4096 tokens; replayed with new contexts
    (longer, shorter, across partitions), new tables and new queries, all written in place."""
    heads, block_size, width = (16, 8, 128), 16, 256
    num_heads, num_kv_heads, head_dim = heads
    dtype, scale, S = torch.bfloat16, 128**-0.5, 8
    num_blocks = S * width + 1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device="cuda")
    v_cache = torch.randn_like(k_cache)
    query = torch.randn(S, num_heads, head_dim, dtype=dtype, device="cuda")
    lens = torch.ones(S, dtype=torch.int32, device="cuda")
    tables = torch.full((S, width), -1, dtype=torch.int32, device="cuda")
    out = poisoned(S, num_heads, head_dim, dtype=dtype, device="cuda")

    def fill(contexts):
        perm = torch.randperm(num_blocks, device="cuda").to(torch.int32)
        tables.fill_(-1)
        for s, ctx in enumerate(contexts):
            n = -(-ctx // block_size)
            tables[s, :n] = perm[s * width : s * width + n]
        lens.copy_(torch.tensor(contexts, dtype=torch.int32))
        query.copy_(torch.randn_like(query))
        out.fill_(float("nan"))

    fill([1] * S)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture
        ops.paged_attention_decode(out, query, k_cache, v_cache, lens, tables, scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_attention_decode(out, query, k_cache, v_cache, lens, tables, scale)

    for contexts in (
        [1, 511, 512, 513, 4096, 2000, 17, 1024],
        [4096] * S,
        [3, 1, 2, 1, 700, 1, 1, 5],
    ):
        fill(contexts)
        graph.replay()
        torch.cuda.synchronize()
        check(out, query, k_cache, v_cache, lens, tables, scale)


def test_decode_cuda_bad_tables_stay_in_bounds():
    """The CUDA op cannot check index contents without a sync: a table of -1 over a context of
    several partitions, or a context longer than its table, reads nothing out of bounds: zeros where
    no key is valid, and a too-long context attends to the keys its table holds."""
    # 48 = 3 whole blocks: past them lie only -1 table entries, no poisoned (unused) cache slot.
    query, k_cache, v_cache, lens, tables = decode_inputs([1500, 48], (16, 8, 128), 16, torch.bfloat16)
    true_lens = lens.clone()
    tables[0] = -1
    lens[1] = tables.shape[1] * 16 + 1000  # past the table
    out = run(query, k_cache, v_cache, lens, tables, 0.1)
    torch.cuda.synchronize()
    assert (out[0] == 0).all()
    check(out[1:], query[1:], k_cache, v_cache, true_lens[1:], tables[1:], 0.1)
