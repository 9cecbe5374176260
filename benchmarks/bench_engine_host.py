"""Host cost of the engine loop on nano-vLLM's bench.py workload, with a model that costs nothing.

Each step is schedule() -> Batch.from_output() (the torch tensors a model runner reads) -> a fake
model that samples token 1 -> postprocess(). Run twice: with KV blocks for every token, and with
blocks for a third of them, so that sequences are preempted and recomputed.

    python benchmarks/bench_engine_host.py [--repeat 5] [--nano-vllm PATH]

--nano-vllm points at a checkout of github.com/GeeeekExplorer/nano-vllm (not shipped here) to time
its Python Scheduler on the same workload in the same run (pip install xxhash transformers first).
Its model-input building lives in its CUDA model runner and is not timed, so its numbers are a lower
bound. The last line printed is one JSON object for comparing commits.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import types
from dataclasses import dataclass, field

import torch

from professional_nano_llm.engine import Batch, Scheduler, SchedulerConfig, StopParams

BLOCK_SIZE = 16


@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def total_tokens(self) -> int:
        return sum(map(len, self.prompts)) + sum(self.max_tokens)


def nano_bench_workload() -> Workload:
    """nano-vLLM's bench.py: the same random calls in the same order."""
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
    max_tokens = [random.randint(100, 1024) for _ in range(256)]
    return Workload(prompts, max_tokens)


@dataclass
class Run:
    total_s: float = 0.0  # schedule + build inputs + postprocess, all steps
    steps: int = 0
    preemptions: int = 0
    decode_us: list[float] = field(default_factory=list)  # per all-decode step
    decode_us_at_256: list[float] = field(default_factory=list)
    phase_us_at_256: dict[str, list[float]] = field(
        default_factory=lambda: {"schedule": [], "build": [], "postprocess": []}
    )

    def record(self, num_seqs: int, is_decode: bool, schedule_ns: int, build_ns: int, post_ns: int):
        self.steps += 1
        step_ns = schedule_ns + build_ns + post_ns
        self.total_s += step_ns / 1e9
        if not is_decode:
            return
        self.decode_us.append(step_ns / 1e3)
        if num_seqs == 256:
            self.decode_us_at_256.append(step_ns / 1e3)
            for name, ns in (("schedule", schedule_ns), ("build", build_ns), ("postprocess", post_ns)):
                self.phase_us_at_256[name].append(ns / 1e3)


def run_ours(w: Workload, num_blocks: int) -> Run:
    config = SchedulerConfig(
        num_blocks=num_blocks,
        block_size=BLOCK_SIZE,
        max_num_seqs=512,
        max_num_batched_tokens=16384,
        max_model_len=4096,
    )
    sched = Scheduler(config)
    for prompt, max_tokens in zip(w.prompts, w.max_tokens):
        sched.add(prompt, StopParams(max_tokens=max_tokens, ignore_eos=True))
    run = Run()
    clock = time.perf_counter_ns
    while sched.has_unfinished:
        t0 = clock()
        out = sched.schedule()
        t1 = clock()
        batch = Batch.from_output(out)
        t2 = clock()
        sampled = torch.ones(batch.sample_indices.shape[0], dtype=torch.int32)  # the "model"
        t3 = clock()
        sched.postprocess(sampled.numpy())
        t4 = clock()
        run.record(out.num_seqs, out.num_tokens == out.num_seqs, t1 - t0, t2 - t1, t4 - t3)
    run.preemptions = sched.num_preemptions
    assert sched.num_free_blocks == num_blocks, "KV blocks leaked"
    return run


def import_nano_vllm(path: str):
    # Load its engine modules without nanovllm/__init__.py, which pulls in flash-attn and CUDA.
    package = types.ModuleType("nanovllm")
    package.__path__ = [f"{path}/nanovllm"]
    sys.modules["nanovllm"] = package
    from nanovllm.engine.scheduler import Scheduler as NanoScheduler
    from nanovllm.engine.sequence import Sequence as NanoSequence
    from nanovllm.sampling_params import SamplingParams as NanoSamplingParams

    return NanoScheduler, NanoSequence, NanoSamplingParams


def run_nano(w: Workload, num_tokens_of_kv: int, nano) -> Run:
    NanoScheduler, NanoSequence, NanoSamplingParams = nano
    block_size = NanoSequence.block_size  # nano-vLLM requires a multiple of 256
    config = types.SimpleNamespace(
        max_num_seqs=512,
        max_num_batched_tokens=16384,
        eos=-1,
        kvcache_block_size=block_size,
        num_kvcache_blocks=-(-num_tokens_of_kv // block_size),
    )
    sched = NanoScheduler(config)
    run = Run()
    preempt = sched.preempt

    def counting_preempt(seq):
        run.preemptions += 1
        preempt(seq)

    sched.preempt = counting_preempt
    for prompt, max_tokens in zip(w.prompts, w.max_tokens):
        params = NanoSamplingParams(temperature=0.6, ignore_eos=True, max_tokens=max_tokens)
        sched.add(NanoSequence(prompt, params))
    clock = time.perf_counter_ns
    while not sched.is_finished():
        t0 = clock()
        seqs, is_prefill = sched.schedule()
        t1 = clock()
        token_ids = [1] * len(seqs)  # the "model"
        t2 = clock()
        sched.postprocess(seqs, token_ids, is_prefill)
        t3 = clock()
        run.record(len(seqs), not is_prefill, t1 - t0, 0, t3 - t2)
    return run


def median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def cell(x: float | None, width: int, digits: int = 1) -> str:
    return f"{x:{width}.{digits}f}" if x is not None else f"{'-':>{width}}"


def summarize(runs: list[Run]) -> dict:
    """Medians over repeats of each run's own statistic."""
    return {
        "total_host_s": median([r.total_s for r in runs]),
        "steps": runs[0].steps,
        "preemptions": runs[0].preemptions,
        "decode_step_us_p50": median([median(r.decode_us) for r in runs]),
        "decode_step_us_mean_at_256": median([mean(r.decode_us_at_256) for r in runs]),
        **{
            f"{name}_us_at_256": median([median(r.phase_us_at_256[name]) for r in runs])
            for name in ("schedule", "build", "postprocess")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per configuration (medians are shown)")
    parser.add_argument("--nano-vllm", metavar="PATH", help="nano-vLLM checkout to time as the baseline")
    args = parser.parse_args()

    w = nano_bench_workload()
    ample = -(-w.total_tokens // BLOCK_SIZE) + 256
    third = -(-w.total_tokens // (3 * BLOCK_SIZE))
    configs = {
        "ours, KV for all tokens": lambda: run_ours(w, ample),
        "ours, KV for 1/3 of tokens": lambda: run_ours(w, third),
    }
    if args.nano_vllm:
        nano = import_nano_vllm(args.nano_vllm)
        configs["nano-vLLM, KV for all tokens"] = lambda: run_nano(w, w.total_tokens + 256 * 256, nano)
        configs["nano-vLLM, KV for 1/3 of tokens"] = lambda: run_nano(w, w.total_tokens // 3, nano)

    results = {}
    for name, fn in configs.items():
        fn()  # warm-up
        results[name] = summarize([fn() for _ in range(args.repeat)])

    print(f"workload: 256 seqs, prompts 100..1024, max_tokens 100..1024 ({w.total_tokens} tokens), "
          f"fake model, median of {args.repeat} runs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = (f"{'configuration':34} {'steps':>6} {'preempt':>8} {'host s':>8} {'decode µs p50':>14} "
              f"{'µs @256':>8} {'schedule':>9} {'build':>7} {'postproc':>9}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:34} {r['steps']:6d} {r['preemptions']:8d} {cell(r['total_host_s'], 8, 4)} "
              f"{cell(r['decode_step_us_p50'], 14)} {cell(r['decode_step_us_mean_at_256'], 8)} "
              f"{cell(r['schedule_us_at_256'], 9)} {cell(r['build_us_at_256'], 7)} "
              f"{cell(r['postprocess_us_at_256'], 9)}")

    ours = results["ours, KV for all tokens"]
    summary = {**ours, "preempt_run": results["ours, KV for 1/3 of tokens"]}
    if args.nano_vllm:
        nano_r = results["nano-vLLM, KV for all tokens"]
        summary["nano_vllm"] = nano_r
        summary["host_s_ratio_vs_nano_vllm"] = nano_r["total_host_s"] / ours["total_host_s"]
        print(f"\nhost time, nano-vLLM / ours: {summary['host_s_ratio_vs_nano_vllm']:.1f}x "
              f"(nano-vLLM's input building is not timed; ours is)")
    else:
        print("\nbaseline: nano-vLLM's Python loop takes about 0.6-1.3 s on these machines "
              "(issue #2); time it here with --nano-vllm PATH")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
