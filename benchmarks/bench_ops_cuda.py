"""The pnl CUDA kernels against the device's measured limits, at Qwen3-0.6B shapes (bf16).

    python benchmarks/bench_ops_cuda.py [--repeat 50]

Memory-bound ops report achieved GB/s (bytes each must read and write once) against a
device-to-device copy; prefill attention reports TFLOP/s (causal: half of 4*T^2*H*D per sequence)
against a large bf16 torch matmul. sample_tokens (temperature only) reports GB/s of one read of its
logits; the top-k/top-p sampler is timed against a full-vocabulary sort, the operation it avoids. Times are medians of CUDA-event timings, µs.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from professional_nano_llm import ops
from professional_nano_llm.engine.sampler import Sampler, SamplingBatch

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, BLOCK = 1024, 16, 8, 128, 3072, 151936, 16
DT = torch.bfloat16


def median_us(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def copy_rate(repeat: int) -> float:
    """GB/s of a 1 GiB device-to-device copy, bytes read plus bytes written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_us(lambda: dst.copy_(src), repeat) / 1e3


def matmul_rate() -> float:
    """TFLOP/s of an 8192^3 bf16 matmul on random data (torch's cuBLAS)."""
    a = torch.randn(8192, 8192, dtype=DT, device="cuda")
    b = torch.randn(8192, 8192, dtype=DT, device="cuda")
    return 2 * 8192**3 / median_us(lambda: a @ b, 10) / 1e6


def paged(num_seqs: int, context: int):
    blocks = -(-context // BLOCK)
    k_cache = torch.randn(num_seqs * blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=DT, device="cuda")
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_seqs * blocks, device="cuda").view(num_seqs, blocks).int()
    lens = torch.full((num_seqs,), context, dtype=torch.int32, device="cuda")
    return k_cache, v_cache, tables, lens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    r = args.repeat
    el = torch.finfo(DT).bits // 8

    copy_gbs, mm_tflops = copy_rate(r), matmul_rate()
    rows = []  # (op, shape, µs, achieved, unit, limit)

    def memory_bound(op, shape, fn, nbytes):
        us = median_us(fn, r)
        rows.append((op, shape, us, nbytes / us / 1e3, "GB/s", copy_gbs))

    for seqs, ctx in ((256, 2048), (64, 8192), (16, 512)):
        kc, vc, tables, lens = paged(seqs, ctx)
        q = torch.randn(seqs, HEADS, HEAD_DIM, dtype=DT, device="cuda")
        o = torch.empty_like(q)
        memory_bound("paged_attention_decode", f"S={seqs} ctx={ctx}",
                     lambda: ops.paged_attention_decode(o, q, kc, vc, lens, tables, HEAD_DIM**-0.5),
                     2 * kc.numel() * el)
        del kc, vc
    for seqs, ctx in ((1, 8192), (8, 2048)):
        kc, vc, tables, lens = paged(seqs, ctx)
        q = torch.randn(seqs * ctx, HEADS, HEAD_DIM, dtype=DT, device="cuda")
        o = torch.empty_like(q)
        cu = torch.arange(0, seqs * ctx + 1, ctx, dtype=torch.int32, device="cuda")
        us = median_us(lambda: ops.paged_attention_prefill(o, q, kc, vc, cu, lens, tables, HEAD_DIM**-0.5), 10)
        flops = seqs * 2 * ctx * ctx * HEADS * HEAD_DIM  # causal half of 4 T^2 H D
        rows.append(("paged_attention_prefill", f"S={seqs} T={ctx}", us, flops / us / 1e6, "TFLOP/s", mm_tflops))
        del kc, vc

    tokens = 8192
    x = torch.randn(tokens, HIDDEN, dtype=DT, device="cuda")
    res, w, y = torch.randn_like(x), torch.randn(HIDDEN, dtype=DT, device="cuda"), torch.empty_like(x)
    memory_bound("rms_norm", f"T={tokens} hidden={HIDDEN}", lambda: ops.rms_norm(y, x, w, 1e-6), 2 * x.numel() * el)
    memory_bound("fused_add_rms_norm", f"T={tokens} hidden={HIDDEN}",
                 lambda: ops.fused_add_rms_norm(x, res, w, 1e-6), 4 * x.numel() * el)
    gate_up = torch.randn(tokens, 2 * MLP, dtype=DT, device="cuda")
    act = torch.empty(tokens, MLP, dtype=DT, device="cuda")
    memory_bound("silu_and_mul", f"T={tokens} d={MLP}", lambda: ops.silu_and_mul(act, gate_up),
                 3 * act.numel() * el)
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=DT, device="cuda")
    q = qkv[:, : HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
    v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].view(tokens, KV_HEADS, HEAD_DIM)
    kc = torch.empty(tokens // BLOCK, BLOCK, KV_HEADS, HEAD_DIM, dtype=DT, device="cuda")
    vc = torch.empty_like(kc)
    slots = torch.randperm(tokens, device="cuda").int()
    positions = torch.randint(0, 4096, (tokens,), device="cuda")
    cos_sin = torch.randn(4096, HEAD_DIM, dtype=DT, device="cuda")
    qkv_bytes = qkv.numel() * el
    memory_bound("store_kv_cache", f"T={tokens}", lambda: ops.store_kv_cache(k, v, kc, vc, slots),
                 2 * 2 * k.numel() * el)
    memory_bound("rotary_embedding", f"T={tokens}",
                 lambda: ops.rotary_embedding(positions, q, k, cos_sin, HEAD_DIM), 2 * (q.numel() + k.numel()) * el)
    if hasattr(ops, "qk_norm_rope_store"):
        qn, kn = torch.randn(HEAD_DIM, dtype=DT, device="cuda"), torch.randn(HEAD_DIM, dtype=DT, device="cuda")
        memory_bound("qk_norm_rope_store", f"T={tokens}",
                     lambda: ops.qk_norm_rope_store(positions, q, k, v, qn, kn, 1e-6, cos_sin, kc, vc, slots),
                     qkv_bytes + (q.numel() + 2 * k.numel()) * el)

    batch = 256
    full = lambda t: torch.full((batch,), t, device="cuda")  # noqa: E731
    # One pass over bf16 logits at temperature 0.6 (nano-vLLM's benchmark): bound by reading them.
    logits_bf16 = (torch.randn(batch, VOCAB, device="cuda") * 3).to(DT)
    sampled, seeds = torch.empty(batch, dtype=torch.int64, device="cuda"), torch.arange(batch, device="cuda")
    memory_bound("sample_tokens", f"B={batch} V={VOCAB} T=0.6",
                 lambda: ops.sample_tokens(sampled, logits_bf16, full(0.6), seeds, seeds * 0), logits_bf16.numel() * el)
    logits = torch.randn(batch, VOCAB, device="cuda") * 3
    u = torch.rand(batch, dtype=torch.float64, device="cuda")
    sb = SamplingBatch(full(0.6), full(50).long(), full(0.9), full(0.0), u, None, None, None, None, None, None, -1,
                       max_top_k=50)
    sampler = Sampler()
    sampler_us = median_us(lambda: sampler(logits, sb), r)
    sort_us = median_us(lambda: logits.sort(dim=-1, descending=True), r)

    print(f"{torch.cuda.get_device_name()}: copy {copy_gbs:.0f} GB/s (read + write), bf16 matmul {mm_tflops:.0f} TFLOP/s")
    header = f"{'op':<24} {'shape':<22} {'µs':>9} {'achieved':>14} {'of limit':>9}"
    print(header)
    print("-" * len(header))
    for op, shape, us, achieved, unit, limit in rows:
        print(f"{op:<24} {shape:<22} {us:>9.1f} {achieved:>8.1f} {unit:<7} {achieved / limit:>8.1%}")
    print(f"{'sampler (top-k/top-p)':<24} {f'B={batch} V={VOCAB}':<22} {sampler_us:>9.1f} "
          f"  full sort alone: {sort_us:.1f} µs ({sort_us / sampler_us:.2f}x the sampler)")
    print(json.dumps({"copy_gbs": copy_gbs, "matmul_tflops": mm_tflops, "sampler_us": sampler_us, "sort_us": sort_us,
                      "ops": [dict(op=o, shape=s, us=u, achieved=a, unit=n, fraction=a / lim)
                              for o, s, u, a, n, lim in rows]}))


if __name__ == "__main__":
    main()
