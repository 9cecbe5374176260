"""`python -m professional_nano_llm`: the engine's version and a smoke run of the C++ scheduler.

Text generation arrives with the model runner; until then this drives the engine loop with a
stand-in model that always samples token 1, and shows what each step would hand to a model.
"""

from __future__ import annotations

import torch

from professional_nano_llm import __version__
from professional_nano_llm.engine import Batch, Scheduler, SchedulerConfig, StopParams


def main() -> None:
    print(f"professional-nano-llm {__version__} (torch {torch.__version__})")
    sched = Scheduler(SchedulerConfig(num_blocks=32, block_size=16, max_num_batched_tokens=64, max_model_len=256))
    shared = list(range(100, 132))  # two full blocks every prompt shares: prefix-cache hits
    for n in (40, 70, 25):
        sched.add(shared + list(range(1, n)), StopParams(max_tokens=4, ignore_eos=True))
    print("step  seqs  tokens  decodes  sampled  KV blocks used")
    step = 0
    while sched.has_unfinished:
        out = sched.schedule()
        batch = Batch.from_output(out)
        sampled = torch.ones(batch.sample_indices.shape[0], dtype=torch.int32)
        print(f"{step:4d}  {out.num_seqs:4d}  {out.num_tokens:6d}  {out.num_decode_seqs:7d}  "
              f"{out.num_sampled:7d}  {sched.stats.num_used_blocks:14d}")
        for f in sched.postprocess(sampled.numpy()):
            print(f"      sequence {f.id} finished: {f.reason}, {f.num_generated_tokens} tokens, "
                  f"{f.num_cached_tokens} prompt tokens from the prefix cache")
        step += 1
    stats = sched.stats
    print(f"prefix cache: {stats.prefix_hits}/{stats.prefix_queries} tokens hit; "
          f"KV blocks in use at the end: {stats.num_used_blocks}")


if __name__ == "__main__":
    main()
