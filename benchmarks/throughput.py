"""Offline throughput: ours vs transformers' generate, measured side by side in one run.

Workload (seed 0): 32 requests, prompts of random token ids with 64..256 tokens, 64..256 output
tokens each, greedy, ignore_eos. transformers runs all 32 prompts as one left-padded batch to the
longest output length; every token it generates is counted, padding rows included, which favours
it. Single stream: one 128-token prompt, 128 new tokens, for both.

    python benchmarks/throughput.py [--model PATH] [--no-baseline] [--dtype float32] [--repeat 3]
                                    [--isa [avx512 avx2 baseline]]
    python benchmarks/throughput.py --workload nano-bench [--model PATH] [--enforce-eager]

``--workload nano-bench`` reproduces nano-vLLM's bench.py on the GPU: Qwen3-0.6B (random bf16
weights from benchmarks/qwen3-0.6b.json unless --model is given), random.seed(0), 256 sequences of
randint(0, 10000) token ids with randint(100, 1024) prompt and output lengths, temperature 0.6,
ignore_eos, max_model_len 4096. Besides nano-vLLM's "Total/Time/Throughput" line it prints the HBM
floor of the same workload: the bytes every decode step must read (all weights, plus the KV of every
running sequence) over the device's measured copy bandwidth, and our fraction of it.

It also prints the matmul floor of the workload: the FLOPs of its projections over the fastest
float32 matmul measured on this machine in the same run (torch.mm or pnl.linear, on a
compute-bound shape). No float32 engine can finish the workload faster on these cores.

Each measurement is repeated (ours and transformers interleaved, so both see the same machine
noise) and the median is reported. Each of our runs starts from an empty prefix cache, so a repeat
prefills its prompts again like the first run.

The header names the CPU and the instruction set of our CPU kernels. --isa runs the benchmark once
per instruction set named (all this CPU runs, if none is), each in a fresh process with PNL_CPU_ISA
set and torch, hence transformers, held to the same set (machine.TORCH_ISA_LIMITS).

The last line printed is one JSON object for comparing commits.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from professional_nano_llm import ProfessionalLLM, SamplingParams, __version__, ops
from professional_nano_llm.layers.linear import Linear, linear, prepack_weight
from professional_nano_llm.loader import resolve_model

from machine import TORCH_ISA_LIMITS, describe_cpu, run_per_isa


def workload(vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(64, 256))] for _ in range(32)]
    output_lens = [rng.randint(64, 256) for _ in range(32)]
    return prompts, output_lens


def time_ours(llm: ProfessionalLLM, prompts: list[list[int]], output_lens: list[int]) -> tuple[float, int]:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    # Repeats send the same prompts: without the reset, every run after the first would find them
    # in the prefix cache and skip their prefill.
    if not llm.reset_prefix_cache():
        raise RuntimeError("the prefix cache could not be reset: a request is still running")
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    generated = sum(len(o.token_ids) for o in outputs)
    assert generated == sum(output_lens)
    return seconds, generated


@torch.inference_mode()
def time_transformers(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int) -> tuple[float, int]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    seconds = time.perf_counter() - start
    return seconds, (out.shape[1] - width) * len(prompts)


def nano_bench_workload() -> tuple[list[list[int]], list[int]]:
    """nano-vLLM bench.py's prompts and output lengths, drawn in its order."""
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(256)]
    return prompts, [rng.randint(100, 1024) for _ in range(256)]


def projection_flops(llm: ProfessionalLLM, prompt_lens: list[int], output_lens: list[int]) -> int:
    """2 x the multiply-adds of the workload's projections: every prompt token and every output
    token but the last (which is never fed back) passes through each block's projections; every
    output token comes out of the vocabulary projection."""
    model = llm.engine.runner.model
    per_token = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, Linear))
    vocab = model.config.vocab_size * model.config.hidden_size
    passes = sum(prompt_lens) + sum(output_lens) - len(output_lens)
    return 2 * (per_token * passes + vocab * sum(output_lens))


def fp32_matmul_rates(repeat: int = 7) -> dict[str, float]:
    """FLOP/s of float32 [2048, 576] x [576, 3072] (SmolLM2's gate_up over a long prefill, compute
    bound) by torch.mm and by pnl.linear on its packed weight; median of `repeat` runs each."""
    x, w = torch.randn(2048, 576), torch.randn(3072, 576)
    packed = prepack_weight(w)
    runs = {"torch.mm": lambda: torch.mm(x, w.t()), "pnl.linear": lambda: linear(x, packed)}
    rates = {}
    for name, fn in runs.items():
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        rates[name] = 2 * x.shape[0] * x.shape[1] * w.shape[0] / statistics.median(times)
    return rates


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeat: int = 20) -> float:
    """Bytes/s of a device-to-device copy, counting the bytes read and the bytes written (median)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeat + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times[3:])


def decode_floor_seconds(prompt_lens: list[int], output_lens: list[int], weight_bytes: int,
                         kv_bytes_per_token: int, bandwidth: float) -> float:
    """Every decode step reads all weights once and the KV of every running sequence; the first
    output token of each sequence comes from its prefill. Prefill and sampling are left out."""
    steps = max(output_lens) - 1
    total = 0
    for j in range(1, steps + 1):
        running = [p + j for p, n in zip(prompt_lens, output_lens) if n - 1 >= j]
        total += weight_bytes + kv_bytes_per_token * sum(running)
    return total / bandwidth


def nano_bench(args) -> None:
    from random_model import random_model  # benchmarks/ is on sys.path when run as a script

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = random_model(Path(__file__).with_name("qwen3-0.6b.json"), tmp, torch.bfloat16, "cuda")
        llm = ProfessionalLLM(str(model), max_model_len=4096, enforce_eager=args.enforce_eager)
    engine = llm.engine
    prompts, output_lens = nano_bench_workload()
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in output_lens]
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)  # warm-up, as bench.py does
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    total = sum(output_lens)
    assert sum(len(o.token_ids) for o in outputs) == total
    print(f"Total: {total}tok, Time: {seconds:.2f}s, Throughput: {total / seconds:.2f}tok/s")

    device = engine.runner.device
    bandwidth = copy_bandwidth(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    kv_per_token = engine.runner.kv_cache[:, :, 0, 0].numel() * engine.runner.kv_cache.element_size()
    floor = decode_floor_seconds([len(p) for p in prompts], output_lens, weight_bytes, kv_per_token, bandwidth)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, professional-nano-llm {__version__}, "
          f"CUDA graphs {'off' if args.enforce_eager else 'on'}")
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); weights {weight_bytes / 1e9:.2f} GB; "
          f"KV {kv_per_token / 1024:.0f} KiB per token")
    print(f"HBM floor {floor:.2f}s = {total / floor:.0f} tok/s; ours {seconds:.2f}s = {floor / seconds:.1%} of the floor")
    print(json.dumps({"workload": "nano-bench", "total_tokens": total, "seconds": seconds,
                      "tok_s": total / seconds, "floor_seconds": floor, "floor_tok_s": total / floor,
                      "fraction_of_floor": floor / seconds, "copy_bandwidth_bytes_s": bandwidth,
                      "device": torch.cuda.get_device_name(device), "cuda_graphs": not args.enforce_eager}))


def load_transformers(source, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if source.format == "gguf":
        model = AutoModelForCausalLM.from_pretrained(source.path.parent, gguf_file=source.path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; medians are shown")
    parser.add_argument("--workload", default="cpu", choices=["cpu", "nano-bench"],
                        help="cpu: the 32-request CPU workload above; nano-bench: nano-vLLM's bench.py on a GPU")
    parser.add_argument("--enforce-eager", action="store_true", help="nano-bench without CUDA graphs")
    parser.add_argument("--isa", nargs="*", choices=list(TORCH_ISA_LIMITS), default=None,
                        help="run once per CPU instruction set (default: every one this CPU runs)")
    args = parser.parse_args()
    if args.isa is not None:
        run_per_isa(__file__, args.isa)
        return
    if args.workload == "nano-bench":
        nano_bench(args)
        return

    llm = ProfessionalLLM(args.model, dtype=args.dtype, device="cpu")
    prompts, output_lens = workload(llm.engine.vocab_size)
    single_prompt, single_len = [t for p in prompts for t in p][:128], 128

    hf = None
    if not args.no_baseline:
        hf = load_transformers(resolve_model(args.model), getattr(torch, args.dtype))
        pad = hf.config.pad_token_id or 0
        time_transformers(hf, prompts[:2], 4, pad)  # warm-up
    time_ours(llm, prompts[:2], [4, 4])  # warm-up

    runs: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        runs.setdefault("ours", []).append(time_ours(llm, prompts, output_lens)[0])
        runs.setdefault("ours_single", []).append(time_ours(llm, [single_prompt], [single_len])[0])
        if hf is not None:
            seconds, hf_tokens = time_transformers(hf, prompts, max(output_lens), pad)
            runs.setdefault("hf", []).append(seconds)
            runs.setdefault("hf_single", []).append(time_transformers(hf, [single_prompt], single_len, pad)[0])
    t = {name: statistics.median(times) for name, times in runs.items()}
    rates = fp32_matmul_rates() if args.dtype == "float32" else {}

    ours_tokens = sum(output_lens)
    rows = [("ours, 32 requests", ours_tokens, t["ours"]), ("ours, single stream", single_len, t["ours_single"])]
    result = {
        "ours_tok_s": ours_tokens / t["ours"],
        "single_stream_ours_tok_s": single_len / t["ours_single"],
        "repeat": args.repeat,
        "cpu_isa": ops.cpu_isa(),
    }
    if hf is not None:
        rows += [("transformers, 32 in one batch", hf_tokens, t["hf"]),
                 ("  of which the workload's tokens", ours_tokens, t["hf"]),
                 ("transformers, single stream", single_len, t["hf_single"])]
        result.update(
            hf_tok_s=hf_tokens / t["hf"],  # every generated token, padding rows included
            hf_workload_tok_s=ours_tokens / t["hf"],
            single_stream_hf_tok_s=single_len / t["hf_single"],
        )
        result["ratio"] = result["ours_tok_s"] / result["hf_tok_s"]
        result["ratio_workload_tokens"] = result["ours_tok_s"] / result["hf_workload_tok_s"]
        result["single_stream_ratio"] = result["single_stream_ours_tok_s"] / result["single_stream_hf_tok_s"]

    print(f"professional-nano-llm {__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"model {args.model or 'bundled SmolLM2-135M'} {args.dtype}")
    print(describe_cpu())
    print(f"median of {args.repeat} run(s)")
    print(f"{'run':32} {'tokens':>7} {'seconds':>8} {'tok/s':>8}")
    for name, tokens, seconds in rows:
        print(f"{name:32} {tokens:7d} {seconds:8.2f} {tokens / seconds:8.1f}")
    if rates:
        flops, rate = projection_flops(llm, list(map(len, prompts)), output_lens), max(rates.values())
        floor = flops / rate
        result.update(matmul_floor_tok_s=ours_tokens / floor, fp32_matmul_flop_s=rate)
        print(f"matmul floor: {flops / 1e12:.2f} TFLOP of projections at {rate / 1e9:.0f} GFLOP/s (fastest "
              f"fp32 matmul here: " + ", ".join(f"{n} {r / 1e9:.0f}" for n, r in rates.items()) + ") = "
              f"{floor:.2f} s = {ours_tokens / floor:.0f} tok/s; ours {t['ours']:.2f} s = {floor / t['ours']:.0%} of it")
    if "ratio" in result:
        print(f"5x transformers would be {5 * result['hf_tok_s']:.0f} tok/s (all its tokens), "
              f"{5 * result['hf_workload_tok_s']:.0f} (the workload's tokens)")
        print(f"ours / transformers: batched {result['ratio']:.2f}x (all its tokens), "
              f"{result['ratio_workload_tokens']:.2f}x (the workload's tokens); "
              f"single stream {result['single_stream_ratio']:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
