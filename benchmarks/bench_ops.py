"""Per-op timings of the pnl kernels against their pure-torch references, at SmolLM2-135M shapes.

    python benchmarks/bench_ops.py [--device cpu] [--dtype bfloat16 float32] [--repeat 20] [--quick]
                                   [--isa [avx512 avx2 baseline]]

Shapes: hidden 576, 9 query heads and 3 KV heads of 64 dims, MLP 1536, KV blocks of 16 tokens.
Decode attention is 32 sequences of 512 context tokens; prefill attention is one prompt of 256
tokens (and 64 and 1024 against SDPA only); the other ops run on 32 (decode) and 256 (prefill)
tokens. The baseline is ops.ref (the test oracle); attention is also timed against torch's
scaled_dot_product_attention on K/V already gathered out of the cache, which is the best case for
torch. linear (float32, the engine's CPU matmul) runs at 1 to 256 rows on each of SmolLM2's
projections against F.linear on the plain weight; a summary per row count gives both rates in
GFLOP/s and, from build/*/fma_peak, the machine's fp32 FMA peak: no kernel can beat F.linear by
more than the peak over F.linear's rate. Ours and the baseline are timed in alternation; each time
is the median of --repeat runs, in µs; ratio = baseline / ours (> 1: ours is faster).

On the CPU the header names the CPU and the instruction set of our kernels. --isa runs the whole
benchmark once per instruction set named (all this CPU runs, if none is), each in a fresh process
with PNL_CPU_ISA set and torch's own kernels held to the same set (machine.TORCH_ISA_LIMITS).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from professional_nano_llm import ops
from professional_nano_llm.ops import ref

from machine import TORCH_ISA_LIMITS, describe_cpu, fma_peak, run_per_isa

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, BLOCK = 576, 9, 3, 64, 1536, 16
PROJECTIONS = {  # out_features x in_features of SmolLM2's matmuls
    "qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
    "o": (HIDDEN, HIDDEN),
    "gate_up": (2 * MLP, HIDDEN),
    "down": (HIDDEN, MLP),
}
LINEAR_ROWS = (1, 8, 16, 32, 64, 256)
DECODE_SEQS, DECODE_CONTEXT, PREFILL_TOKENS = 32, 512, 256
SCALE = HEAD_DIM**-0.5


class Case(NamedTuple):
    op: str
    shape: str
    ours: Callable[[], object]
    baseline_name: str
    baseline: Callable[[], object]
    rows: int = 0  # linear: M, for the summary


def median_us(ours, baseline, repeat: int, device: str) -> tuple[float, float]:
    """Median µs of each, timed in alternation, so both see the same spells of machine noise."""
    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e6

    for _ in range(3):
        ours(), baseline()
    pairs = [(timed(ours), timed(baseline)) for _ in range(repeat)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def paged_inputs(num_seqs, context, q_tokens, dtype, device):
    """Random caches holding num_seqs contexts in shuffled blocks, and the new tokens' queries."""
    blocks_per_seq = -(-context // BLOCK)
    num_blocks = num_seqs * blocks_per_seq
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device=device).view(num_seqs, blocks_per_seq).int()
    lens = torch.full((num_seqs,), context, dtype=torch.int32, device=device)
    query = torch.randn(q_tokens, HEADS, HEAD_DIM, dtype=dtype, device=device)
    return query, k_cache, v_cache, lens, tables


def gathered(cache, tables, context):
    """[S, Hkv, context, D] K or V of every sequence, out of the paged cache."""
    seqs = [ref.gather_context(cache, table, context) for table in tables]
    return torch.stack(seqs).transpose(1, 2).contiguous()


def decode_cases(dtype, device):
    q, kc, vc, lens, tables = paged_inputs(DECODE_SEQS, DECODE_CONTEXT, DECODE_SEQS, dtype, device)
    o = torch.empty_like(q)
    k, v = gathered(kc, tables, DECODE_CONTEXT), gathered(vc, tables, DECODE_CONTEXT)
    q_sdpa = q[:, :, None, :]  # [S, H, 1, D]
    shape = f"S={DECODE_SEQS} ctx={DECODE_CONTEXT}"

    def ours():
        ops.paged_attention_decode(o, q, kc, vc, lens, tables, SCALE)

    def ref_decode():
        return ref.paged_attention_decode(q, kc, vc, lens, tables, SCALE)

    def sdpa():
        return F.scaled_dot_product_attention(q_sdpa, k, v, scale=SCALE, enable_gqa=True)

    op = "paged_attention_decode"
    return [Case(op, shape, ours, "ref", ref_decode), Case(op, shape, ours, "sdpa", sdpa)]


def prefill_cases(tokens, dtype, device, with_ref):
    q, kc, vc, lens, tables = paged_inputs(1, tokens, tokens, dtype, device)
    o = torch.empty_like(q)
    cu = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    k, v = gathered(kc, tables, tokens), gathered(vc, tables, tokens)
    q_sdpa = q.transpose(0, 1)[None]  # [1, H, T, D]

    def ours():
        ops.paged_attention_prefill(o, q, kc, vc, cu, lens, tables, SCALE)

    def ref_prefill():
        return ref.paged_attention_prefill(q, kc, vc, cu, lens, tables, SCALE)

    def sdpa():
        return F.scaled_dot_product_attention(
            q_sdpa, k, v, is_causal=True, scale=SCALE, enable_gqa=True
        )

    op, shape = "paged_attention_prefill", f"T={tokens}"
    cases = [Case(op, shape, ours, "ref", ref_prefill)] if with_ref else []
    return cases + [Case(op, shape, ours, "sdpa", sdpa)]


def token_cases(tokens, dtype, device):
    """store_kv_cache, rotary_embedding, the norms and silu_and_mul on `tokens` tokens."""
    # K and V (and q) as the model passes them: slices of one fused qkv output.
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=dtype, device=device)
    query = qkv[:, : HEADS * HEAD_DIM]
    key = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
    value = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].view(tokens, KV_HEADS, HEAD_DIM)
    kc = torch.zeros(-(-tokens // BLOCK) * 4, BLOCK, KV_HEADS, HEAD_DIM, dtype=dtype, device=device)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(kc.shape[0] * BLOCK, device=device)[:tokens].int()

    positions = torch.randint(0, 2048, (tokens,), device=device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, device=device).float() / HEAD_DIM))
    freqs = torch.outer(torch.arange(2048, device=device).float(), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)

    x = torch.randn(tokens, HIDDEN, dtype=dtype, device=device)
    residual = torch.randn_like(x)
    weight = torch.randn(HIDDEN, dtype=dtype, device=device)
    y = torch.empty_like(x)
    gate_up = torch.randn(tokens, 2 * MLP, dtype=dtype, device=device)
    act = torch.empty(tokens, MLP, dtype=dtype, device=device)

    t, th = f"T={tokens}", f"T={tokens} hidden={HIDDEN}"
    pos, cs, D = positions, cos_sin, HEAD_DIM
    return [
        Case("store_kv_cache", t, lambda: ops.store_kv_cache(key, value, kc, vc, slots),
             "ref", lambda: ref.store_kv_cache(key, value, kc, vc, slots)),
        Case("rotary_embedding", t, lambda: ops.rotary_embedding(pos, query, key, cs, D),
             "ref", lambda: ref.rotary_embedding(pos, query, key, cs, D)),
        Case("rms_norm", th, lambda: ops.rms_norm(y, x, weight, 1e-5),
             "ref", lambda: ref.rms_norm(x, weight, 1e-5)),
        Case("fused_add_rms_norm", th, lambda: ops.fused_add_rms_norm(x, residual, weight, 1e-5),
             "ref", lambda: ref.fused_add_rms_norm(x, residual, weight, 1e-5)),
        Case("silu_and_mul", f"T={tokens} d={MLP}", lambda: ops.silu_and_mul(act, gate_up),
             "ref", lambda: ref.silu_and_mul(gate_up)),
    ]  # fmt: skip


def linear_cases(dtype, device):
    """pnl.linear on the packed weight against F.linear on the plain one, for each projection."""
    out = []
    for rows in LINEAR_ROWS:
        for name, (n, k) in PROJECTIONS.items():
            weight = torch.randn(n, k, dtype=dtype, device=device) / k**0.5
            packed = ops.pack_linear_weight(weight)
            x = torch.randn(rows, k, dtype=dtype, device=device)
            y = torch.empty(rows, n, dtype=dtype, device=device)
            out.append(Case("linear", f"M={rows} {name} {n}x{k}", lambda y=y, x=x, p=packed: ops.linear(y, x, p),
                            "F.linear", lambda x=x, w=weight: F.linear(x, w), rows))
    return out


def cases(dtype, device):
    matmuls = linear_cases(dtype, device) if device == "cpu" and dtype == torch.float32 else []
    return matmuls + (
        decode_cases(dtype, device)
        + prefill_cases(PREFILL_TOKENS, dtype, device, with_ref=True)
        + prefill_cases(64, dtype, device, with_ref=False)
        + prefill_cases(1024, dtype, device, with_ref=False)
        + token_cases(DECODE_SEQS, dtype, device)
        + token_cases(PREFILL_TOKENS, dtype, device)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="5 runs per op")
    parser.add_argument("--isa", nargs="*", choices=list(TORCH_ISA_LIMITS), default=None,
                        help="run once per CPU instruction set (default: every one this CPU runs)")
    args = parser.parse_args()
    if args.isa is not None:
        run_per_isa(__file__, args.isa)
        return
    repeat = 5 if args.quick else args.repeat
    torch.manual_seed(0)
    threads = torch.get_num_threads() if args.device == "cpu" else "-"
    where = f"{describe_cpu()}, " if args.device == "cpu" else ""
    print(f"device {args.device}, {where}{threads} threads, median of {repeat} runs")
    header = (
        f"{'op':<24} {'shape':<26} {'dtype':<9} {'ours µs':>9} {'baseline':>8} {'base µs':>10} "
        f"{'ratio':>7}"
    )
    print(header)
    print("-" * len(header))
    linear_us: dict[int, list[float]] = {}  # rows -> [ours, F.linear], summed over the projections
    for name in args.dtype:
        dtype = getattr(torch, name)
        for case in cases(dtype, args.device):
            ours, base = median_us(case.ours, case.baseline, repeat, args.device)
            print(
                f"{case.op:<24} {case.shape:<26} {name:<9} {ours:>9.1f} {case.baseline_name:>8} "
                f"{base:>10.1f} {base / ours:>6.2f}x"
            )
            if case.rows:
                totals = linear_us.setdefault(case.rows, [0.0, 0.0])
                totals[0], totals[1] = totals[0] + ours, totals[1] + base
    if linear_us:
        print_linear_summary(linear_us)


def print_linear_summary(linear_us: dict[int, list[float]]) -> None:
    """Each row count's rates over the four projections, against the FMA peak."""
    peak = fma_peak()
    print(f"\nlinear over SmolLM2's four projections; fp32 FMA peak {peak / 1e9:.0f} GFLOP/s (build/*/fma_peak)"
          if peak else "\nlinear over SmolLM2's four projections (fma_peak not built: no peak)")
    for rows, (ours, base) in sorted(linear_us.items()):
        flops = sum(2 * rows * n * k for n, k in PROJECTIONS.values())
        ceiling = f", the peak allows at most {peak / (flops / base * 1e6):.2f}x" if peak else ""
        if peak and flops / base * 1e6 > peak:
            ceiling += ": F.linear beats this set's peak, so torch does not keep to it here"
        print(f"  M={rows:<4} ours {flops / ours / 1e3:6.1f} GFLOP/s, F.linear {flops / base / 1e3:6.1f} "
              f"({base / ours:.2f}x{ceiling})")


if __name__ == "__main__":
    main()
