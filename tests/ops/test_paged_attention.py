"""paged_attention_prefill / _decode against ops.ref over the gathered context.

Error rule (flash-attention's): max |ours - float64 ref| <= 2 * max |torch in the same dtype -
float64 ref| + 1e-5; float64 inputs must match the float64 ref to 1e-10.
"""

from __future__ import annotations

import pytest
import torch
from ops_testing import CPU_DEVICES, DEVICES, paged_kv, strided_rows
from professional_nano_llm import ops
from professional_nano_llm.ops import ref

# ((num_heads, num_kv_heads, head_dim), block_size): SmolLM2 (GQA 3) at every block size, MHA, GQA 8
# with an odd head_dim, MQA 16 at head_dim 256 (tiles of 16 rows even in decode).
CONFIGS = [
    ((9, 3, 64), 16),
    ((9, 3, 64), 8),
    ((9, 3, 64), 256),
    ((4, 4, 128), 16),
    ((16, 2, 80), 8),
    ((16, 1, 256), 256),
]


def same_dtype_prefill(query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale):
    """ref.paged_attention_prefill's math without the upcast: plain torch in query's dtype."""
    out = torch.empty_like(query)
    for s in range(context_lens.shape[0]):
        start, end, ctx = int(cu_seqlens_q[s]), int(cu_seqlens_q[s + 1]), int(context_lens[s])
        q = query[start:end]
        k = ref.gather_context(k_cache, block_tables[s], ctx)
        v = ref.gather_context(v_cache, block_tables[s], ctx)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = ctx - q.shape[0] + torch.arange(q.shape[0], device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, None, :] > q_pos[None, :, None]
        probs = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v)
    return out


def assert_attention_close(
    out, query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale
):
    args = (cu_seqlens_q, context_lens, block_tables, scale)
    exact = ref.paged_attention_prefill(query.double(), k_cache.double(), v_cache.double(), *args)
    err = (out.double() - exact).abs().max().item()
    if query.dtype == torch.float64:
        assert err <= 1e-10, err
        return
    if err <= 1e-5:  # within the rule whatever torch's error (spares computing it, in float32)
        return
    baseline = (
        (same_dtype_prefill(query, k_cache, v_cache, *args).double() - exact).abs().max().item()
    )
    assert err <= 2 * baseline + 1e-5, f"error {err:.3g} vs torch's {baseline:.3g} in {query.dtype}"


def run_prefill(q_lens, context_lens, heads, block_size, dtype, device, strided=False, scale=None):
    num_heads, num_kv_heads, head_dim = heads
    k_cache, v_cache, block_tables, lens = paged_kv(
        context_lens, num_kv_heads, head_dim, block_size, dtype, device
    )
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    T = sum(q_lens)
    if strided:  # q as a slice of a fused qkv output
        query = strided_rows(
            T, (num_heads, head_dim), dtype, device, pad=2 * num_kv_heads * head_dim
        )
    else:
        query = torch.randn(T, num_heads, head_dim, dtype=dtype, device=device)
    out = torch.full_like(query, float("nan")).contiguous()
    scale = head_dim**-0.5 if scale is None else scale
    ops.paged_attention_prefill(out, query, k_cache, v_cache, cu, lens, block_tables, scale)
    assert_attention_close(out, query, k_cache, v_cache, cu, lens, block_tables, scale)
    return out, (query, k_cache, v_cache, block_tables, lens)


def run_decode(context_lens, heads, block_size, dtype, device, strided=False):
    num_heads, num_kv_heads, head_dim = heads
    k_cache, v_cache, block_tables, lens = paged_kv(
        context_lens, num_kv_heads, head_dim, block_size, dtype, device
    )
    S = len(context_lens)
    if strided:
        query = strided_rows(
            S, (num_heads, head_dim), dtype, device, pad=2 * num_kv_heads * head_dim
        )
    else:
        query = torch.randn(S, num_heads, head_dim, dtype=dtype, device=device)
    out = torch.full_like(query, float("nan")).contiguous()
    scale = head_dim**-0.5
    ops.paged_attention_decode(out, query, k_cache, v_cache, lens, block_tables, scale)
    cu = torch.arange(S + 1, dtype=torch.int32, device=device)
    assert_attention_close(out, query, k_cache, v_cache, cu, lens, block_tables, scale)
    return out, (query, k_cache, v_cache, block_tables, lens)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "block_size"), CONFIGS)
def test_paged_attention_prefill(device, dtype, heads, block_size):
    """Plain prefills (q_len = context) and chunked ones (prefix in the cache), 1 to 100 tokens."""
    q_lens = [1, 37, 5, 64, 1, 100]
    context_lens = [1, 37, 70, 64, 300, 133]
    run_prefill(q_lens, context_lens, heads, block_size, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_paged_attention_prefill_dtypes_and_empty_sequence(device, dtype):
    """A sequence with no new token among others writes nothing and breaks nothing."""
    run_prefill([3, 0, 17], [40, 25, 17], (6, 2, 64), 16, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("q_len", "context_len"), [(1024, 1024), (96, 2100), (1, 2049)])
def test_paged_attention_prefill_long(device, q_len, context_len):
    """Long contexts across hundreds of blocks: a whole 1k prompt and chunks at the end of 2k."""
    run_prefill([q_len], [context_len], (9, 3, 64), 16, torch.bfloat16, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_prefill_strided_query(device, dtype):
    run_prefill([30, 7, 1], [30, 50, 9], (9, 3, 64), 16, dtype, device, strided=True)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_attention_prefill_scale(device):
    """The scale argument is honoured (large scale: nearly argmax attention)."""
    run_prefill([20], [45], (4, 2, 32), 8, torch.float32, device, scale=3.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "block_size"), CONFIGS)
def test_paged_attention_decode(device, dtype, heads, block_size):
    """Contexts at and around the 256-token partition boundary, and a single-token one."""
    run_decode([1, 2, 255, 256, 257, 511, 513, 700], heads, block_size, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_paged_attention_decode_dtypes(device, dtype):
    run_decode([1, 300, 17], (8, 2, 64), 16, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_decode_long_and_strided(device, dtype):
    run_decode([2100, 4097, 3, 1024], (9, 3, 64), 16, dtype, device, strided=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads", [(9, 3, 64), (16, 1, 256)])
def test_decode_matches_prefill(device, heads):
    """The last prefill row of each sequence is exactly a decode step over the same cache."""
    context_lens = [1, 40, 257, 600]
    out, (query, k_cache, v_cache, block_tables, lens) = run_prefill(
        context_lens, context_lens, heads, 16, torch.float32, device
    )
    last = torch.tensor(context_lens, device=device).cumsum(0) - 1
    decode_out = torch.empty_like(query[last])
    ops.paged_attention_decode(
        decode_out, query[last], k_cache, v_cache, lens, block_tables, heads[2] ** -0.5
    )
    torch.testing.assert_close(decode_out, out[last], atol=1e-5, rtol=1e-5)


def attention_args(device):
    """Valid prefill arguments (2 sequences, 6 new tokens), to break one at a time."""
    k_cache, v_cache, block_tables, lens = paged_kv([10, 4], 2, 32, 8, torch.float32, device)
    query = torch.randn(6, 4, 32, device=device)
    return dict(
        out=torch.empty_like(query),
        query=query,
        k_cache=k_cache,
        v_cache=v_cache,
        cu_seqlens_q=torch.tensor([0, 2, 6], dtype=torch.int32, device=device),
        context_lens=lens,
        block_tables=block_tables,
        scale=0.1,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(cu_seqlens_q=torch.tensor([0, 2, 6])), "int32"),
        (dict(context_lens=torch.tensor([10, 4])), "int32"),
        (dict(block_tables=torch.zeros(2, 2)), "int32"),
        (dict(cu_seqlens_q=torch.tensor([0, 2], dtype=torch.int32)), "num_seqs \\+ 1"),
        (dict(query=torch.randn(6, 3, 32), out=torch.empty(6, 3, 32)), "multiple of num_kv_heads"),
        (dict(query=torch.randn(6, 4, 16), out=torch.empty(6, 4, 16)), "head_dim"),
        (dict(out=torch.empty(6, 4, 32, dtype=torch.bfloat16)), "one dtype"),
        (dict(out=torch.empty(5, 4, 32)), "out must have"),
        (dict(v_cache=torch.randn(6, 8, 2, 32).bfloat16()), "one dtype"),
        (dict(query=torch.randn(6, 32, 4).transpose(1, 2)), "contiguous last dim"),
        # each once divided by (SIGFPE)
        (dict(k_cache=torch.randn(6, 0, 2, 32), v_cache=torch.randn(6, 0, 2, 32)), "block_size must be > 0"),
        (dict(query=torch.randn(6, 4, 0), out=torch.empty(6, 4, 0), k_cache=torch.randn(6, 8, 2, 0),
              v_cache=torch.randn(6, 8, 2, 0)), "head_dim and block_size must be > 0"),
        (dict(query=torch.randn(6, 0, 32), out=torch.empty(6, 0, 32)), "num_heads, head_dim"),
    ],
)
def test_paged_attention_prefill_rejects(device, change, message):
    args = attention_args(device)
    args.update({name: t.to(device) for name, t in change.items()})
    with pytest.raises(RuntimeError, match=message):
        ops.paged_attention_prefill(**args)


# Index contents are checked where they live on the host. The CUDA kernels cannot read them
# without a device sync, so there they stay in bounds instead (tests/ops/*_cuda.py).
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32)), "from 0 to num_tokens"),
        (dict(cu_seqlens_q=torch.tensor([0, 1, 6], dtype=torch.int32)), "new tokens"),
        (dict(context_lens=torch.tensor([10, 17], dtype=torch.int32)), "does not fit"),
        (dict(block_tables=torch.tensor([[0, 99], [1, -1]], dtype=torch.int32)), "out of range"),
        (dict(block_tables=torch.tensor([[0, 1], [-1, -1]], dtype=torch.int32)), "out of range"),
    ],
)
def test_paged_attention_prefill_rejects_bad_indices_on_cpu(change, message):
    args = attention_args("cpu")
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        ops.paged_attention_prefill(**args)


def decode_args(device):
    args = attention_args(device)
    del args["cu_seqlens_q"]
    args["query"], args["out"] = args["query"][:2], args["out"][:2]
    return args


@pytest.mark.parametrize("device", DEVICES)
def test_paged_attention_decode_rejects(device):
    args = decode_args(device)
    with pytest.raises(RuntimeError, match="one token per sequence"):
        ops.paged_attention_decode(**{**args, "query": args["query"][:1], "out": args["out"][:1]})
    no_slots = torch.randn(6, 0, 2, 32, device=device)  # blocks of 0 tokens: a division by zero before
    empty = torch.zeros(2, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match="block_size must be > 0"):
        ops.paged_attention_decode(**{**args, "k_cache": no_slots, "v_cache": no_slots.clone(), "context_lens": empty})


def test_paged_attention_decode_rejects_bad_indices_on_cpu():
    args = decode_args("cpu")
    with pytest.raises(RuntimeError, match="a decoding sequence has at least one token"):
        ops.paged_attention_decode(**{**args, "context_lens": torch.tensor([3, 0], dtype=torch.int32)})
    with pytest.raises(RuntimeError, match="out of range"):
        bad = torch.tensor([[0, 1], [99, -1]], dtype=torch.int32)
        ops.paged_attention_decode(**{**args, "block_tables": bad})


@pytest.mark.cuda
def test_paged_attention_rejects_mixed_devices():
    args = attention_args("cuda")
    args["context_lens"] = args["context_lens"].cpu()
    with pytest.raises(RuntimeError, match="one device"):
        ops.paged_attention_prefill(**args)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_attention_full_table(device):
    """Contexts that end exactly on a block boundary of an exactly-sized table: nothing past it is
    read (the tables of paged_kv mark unused entries -1, and here there are none)."""
    for context in (32, 64, 256):
        run_prefill([context], [context], (4, 2, 64), 16, torch.float32, device)
        run_decode([context], (4, 2, 64), 16, torch.float32, device)


@pytest.mark.parametrize("device", CPU_DEVICES)
@pytest.mark.parametrize("group", range(1, 10))
def test_paged_attention_decode_every_group(device, group):
    """Each GQA group size of the CPU's head_dim-vectorised decode tiles (1-8) and the first beyond
    them, at a head_dim (72) that leaves a tail after the SIMD vectors."""
    run_decode([1, 40, 257, 600], (2 * group, 2, 72), 16, torch.float32, device)


@pytest.mark.parametrize("device", CPU_DEVICES)
@pytest.mark.parametrize("context_len", [1, 33, 100, 300, 1000])
@pytest.mark.parametrize("heads", [(9, 3, 64), (16, 1, 256)])
def test_paged_attention_decode_lone_sequence(device, context_len, heads):
    """With fewer sequences than threads, the CPU splits the context into smaller partitions (down
    to 32 keys) and merges them; 4 threads force the split on any machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        run_decode([context_len], heads, 16, torch.float32, device)
    finally:
        torch.set_num_threads(threads)
