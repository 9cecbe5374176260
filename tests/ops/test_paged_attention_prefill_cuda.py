"""paged_attention_prefill's CUDA kernels beyond the generic tests of test_paged_attention.py.

Batches mix plain prefills, chunked prefills and prefix-cache hits (q_len 1..300, contexts up to
~3000) over the tensor-core kernel (bf16/fp16, head_dim 64/128/256) and the simple kernel
(fp32/fp64, other head_dims, unaligned rows); every output starts as NaN, and is compared with
ops.ref in float64 by test_paged_attention's rule.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from ops_testing import paged_kv, poisoned, strided_rows
from professional_nano_llm import ops
from test_paged_attention import assert_attention_close

pytestmark = pytest.mark.cuda

# ((num_heads, num_kv_heads, head_dim), block_size): GQA 1, 2 and 8 at each tensor-core head_dim,
# pages smaller than, equal to and larger than a key tile; then odd head_dims (simple kernel).
MMA_CONFIGS = [
    ((4, 4, 64), 8),
    ((8, 4, 64), 256),
    ((16, 2, 128), 16),
    ((8, 8, 128), 256),
    ((8, 1, 128), 8),
    ((4, 2, 256), 16),
    ((8, 1, 256), 256),
]
ODD_CONFIGS = [((16, 2, 80), 16), ((6, 3, 72), 8), ((4, 4, 96), 256)]


def mixed_batch(generator, num_seqs: int, max_q: int = 300, max_context: int = 3000):
    """(q_lens, context_lens): plain prefills, chunks after a cached prefix, single tokens and one
    empty sequence, in random order."""
    q_lens, contexts = [], []
    for i in range(num_seqs):
        kind = i % 4
        q = int(torch.randint(1, max_q + 1, (1,), generator=generator))
        if kind == 0:  # plain prefill
            contexts.append(q)
        elif kind == 1:  # chunked prefill / prefix hit: new tokens after a cached prefix
            prefix = int(torch.randint(1, max_context - max_q, (1,), generator=generator))
            contexts.append(q + prefix)
        elif kind == 2:  # one new token over a long context
            q = 1
            contexts.append(int(torch.randint(1, max_context, (1,), generator=generator)))
        else:  # a prefix that ends exactly on a 64-token tile
            q = 64 * int(torch.randint(1, 4, (1,), generator=generator))
            contexts.append(q + 64 * int(torch.randint(0, 8, (1,), generator=generator)))
        q_lens.append(q)
    q_lens.append(0)  # a sequence with nothing new
    contexts.append(int(torch.randint(1, 100, (1,), generator=generator)))
    order = torch.randperm(len(q_lens), generator=generator).tolist()
    return [q_lens[i] for i in order], [contexts[i] for i in order]


def prefill(
    q_lens, context_lens, heads, block_size, dtype, *, query_pad=None, out_pad=None, scale=None
):
    """Runs the op on fresh random inputs; query/out are strided views when a pad is given.
    Returns (out, inputs) after checking out against the float64 reference."""
    num_heads, num_kv_heads, head_dim = heads
    k_cache, v_cache, block_tables, lens = paged_kv(
        context_lens, num_kv_heads, head_dim, block_size, dtype, "cuda"
    )
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).cuda()
    T = sum(q_lens)
    if query_pad is None:
        query = torch.randn(T, num_heads, head_dim, dtype=dtype, device="cuda")
    else:
        query = strided_rows(T, (num_heads, head_dim), dtype, "cuda", pad=query_pad)
    if out_pad is None:
        out = poisoned(T, num_heads, head_dim, dtype=dtype, device="cuda")
    else:
        base = poisoned(T, num_heads * head_dim + out_pad, dtype=dtype, device="cuda")
        out = base[:, out_pad:].view(T, num_heads, head_dim)
    scale = head_dim**-0.5 if scale is None else scale
    args = (query, k_cache, v_cache, cu, lens, block_tables, scale)
    ops.paged_attention_prefill(out, *args)
    torch.cuda.synchronize()
    assert not out.isnan().any(), f"{int(out.isnan().sum())} outputs not written"
    assert_attention_close(out, query, k_cache, v_cache, cu, lens, block_tables, scale)
    return out, args


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("heads", "block_size"), MMA_CONFIGS + ODD_CONFIGS)
def test_prefill_cuda_mixed_batch(dtype, heads, block_size):
    generator = torch.Generator().manual_seed(zlib.crc32(repr((dtype, heads, block_size)).encode()))
    q_lens, context_lens = mixed_batch(generator, num_seqs=8)
    prefill(q_lens, context_lens, heads, block_size, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("heads", "block_size"), [((8, 2, 64), 16), ((4, 4, 128), 8), ((16, 2, 80), 256)]
)
def test_prefill_cuda_float_dtypes(dtype, heads, block_size):
    """float32 and float64 take the simple kernel (float64 accumulates in double)."""
    generator = torch.Generator().manual_seed(11)
    q_lens, context_lens = mixed_batch(generator, num_seqs=4, max_q=120, max_context=800)
    prefill(q_lens, context_lens, heads, block_size, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_prefill_cuda_tile_edges(dtype, head_dim):
    """q_len around the 64-row query tile and contexts around the 64/32-key tiles, all in one
    batch, so tiles of many sequences share the launch."""
    q_lens = [1, 2, 63, 64, 65, 127, 128, 129, 31, 33, 1]
    context_lens = [1, 33, 63, 64, 65, 127, 128 + 64, 129 + 31, 31 + 32, 33 + 63, 65]
    prefill(q_lens, context_lens, (4, 2, head_dim), 16, dtype)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_cuda_strided_query_and_out(head_dim):
    """query a slice of a fused qkv output, out a slice too: aligned pads keep the tensor-core
    kernel, an odd pad sends bf16 to the simple kernel (cp.async needs 16-byte rows)."""
    q_lens, context_lens = [100, 1, 37], [100, 700, 300]
    heads = (8, 2, head_dim)
    prefill(q_lens, context_lens, heads, 16, torch.bfloat16, query_pad=4 * head_dim, out_pad=8)
    prefill(q_lens, context_lens, heads, 16, torch.bfloat16, query_pad=3, out_pad=5)


def test_prefill_cuda_scale():
    """A large scale (nearly argmax attention) on the tensor-core kernel: the running max moves
    a lot between key tiles."""
    prefill([90, 7], [200, 7], (4, 2, 64), 8, torch.float16, scale=1.0)


@pytest.mark.parametrize("head_dim", [128, 256])
def test_prefill_cuda_long_prompts(head_dim):
    """A whole 3k prompt, and a 300-token chunk at the end of a 3k context (prefix hit)."""
    prefill([3000], [3000], (8, 1, head_dim), 16, torch.bfloat16)
    prefill([300], [3000], (8, 2, head_dim), 256, torch.bfloat16)


def test_prefill_cuda_many_sequences():
    """Many sequences of up to 600 tokens: the tile slots of the launch (T / 64 + S) map onto
    every query tile exactly once."""
    generator = torch.Generator().manual_seed(5)
    q_lens = torch.randint(1, 601, (96,), generator=generator).tolist()
    context_lens = [q + int(torch.randint(0, 200, (1,), generator=generator)) for q in q_lens]
    prefill(q_lens, context_lens, (8, 2, 128), 16, torch.bfloat16)


@pytest.mark.parametrize(
    ("dtype", "head_dim"), [(torch.bfloat16, 128), (torch.float16, 256), (torch.float32, 64)]
)
def test_prefill_cuda_deterministic(dtype, head_dim):
    """Two runs on the same inputs are bitwise identical (no race, no order-dependent sums)."""
    generator = torch.Generator().manual_seed(3)
    q_lens, context_lens = mixed_batch(generator, num_seqs=6)
    out, args = prefill(q_lens, context_lens, (8, 2, head_dim), 16, dtype)
    again = poisoned(*out.shape, dtype=dtype, device="cuda")
    ops.paged_attention_prefill(again, *args)
    assert torch.equal(out, again)


def test_prefill_cuda_graph_capture():
    """The op reads no index on the host, so it can be captured once and replayed with new
    lengths and tables in the same buffers."""
    heads, block_size, dtype = (8, 2, 128), 16, torch.bfloat16
    q_lens, context_lens = [40, 1, 23], [90, 300, 23]
    out, (query, k_cache, v_cache, cu, lens, block_tables, scale) = prefill(
        q_lens, context_lens, heads, block_size, dtype
    )
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch asks
        ops.paged_attention_prefill(out, query, k_cache, v_cache, cu, lens, block_tables, scale)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_attention_prefill(out, query, k_cache, v_cache, cu, lens, block_tables, scale)

    # New lengths with the same token count, fresh data, then replay.
    new_q, new_ctx = [10, 50, 4], [10, 64, 200]
    k2, v2, tables2, lens2 = paged_kv(new_ctx, heads[1], heads[2], block_size, dtype, "cuda")
    assert k2.shape[0] <= k_cache.shape[0] and tables2.shape[1] <= block_tables.shape[1]
    k_cache[: k2.shape[0]].copy_(k2)
    v_cache[: v2.shape[0]].copy_(v2)
    block_tables.fill_(-1)
    block_tables[:, : tables2.shape[1]].copy_(tables2)
    lens.copy_(lens2)
    cu.copy_(torch.tensor([0] + new_q, dtype=torch.int32).cumsum(0))
    query.copy_(torch.randn_like(query))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert not out.isnan().any()
    assert_attention_close(out, query, k_cache, v_cache, cu, lens, block_tables, scale)


@pytest.mark.parametrize("head_dim", [128, 80], ids=["tensor-core", "simple"])
def test_prefill_cuda_bad_indices_stay_in_bounds(head_dim):
    """The CUDA op cannot check index contents without a sync: a context longer than its block
    table row and -1 entries inside a context read nothing out of bounds and give finite output."""
    contexts = [100, 70]
    k_cache, v_cache, tables, lens = paged_kv(contexts, 2, head_dim, 16, torch.bfloat16, "cuda")
    lens[1] = tables.shape[1] * 16 + 500  # past the table row (which ends the allocation)
    tables[0, 1] = -1
    cu = torch.tensor([0, 40, 70], dtype=torch.int32, device="cuda")
    query = torch.randn(70, 8, head_dim, dtype=torch.bfloat16, device="cuda")
    out = poisoned(70, 8, head_dim, dtype=torch.bfloat16, device="cuda")
    ops.paged_attention_prefill(out, query, k_cache, v_cache, cu, lens, tables, head_dim**-0.5)
    torch.cuda.synchronize()
    assert out.isfinite().all()
