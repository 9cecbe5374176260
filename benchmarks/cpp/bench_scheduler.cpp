// Steady-state cost of one all-decode engine step in C++ alone: schedule() + postprocess(),
// at 64 / 256 / 1024 running sequences. The Python loop adds its own cost on top
// (benchmarks/bench_engine_host.py measures that).
#include <benchmark/benchmark.h>

#include <numeric>
#include <vector>

#include "pnl/core/scheduler.h"

using namespace pnl::core;

namespace {

constexpr int32_t kPromptLen = 512;
constexpr int32_t kMaxTokens = 3000;

void fill(Scheduler& sched, int32_t num_seqs) {
  std::vector<TokenId> prompt(kPromptLen);
  for (int32_t s = 0; s < num_seqs; ++s) {
    std::iota(prompt.begin(), prompt.end(), s * kPromptLen);  // distinct: no prefix sharing
    sched.add(prompt, StopParams{kMaxTokens, 0, true, {}, {}});
  }
}

void step(Scheduler& sched, std::vector<TokenId>& sampled) {
  const ScheduleOutput& out = sched.schedule();
  sampled.assign(out.num_sampled, 1);
  sched.postprocess(sampled.data(), out.num_sampled);
}

void BM_DecodeStep(benchmark::State& state) {
  const auto num_seqs = static_cast<int32_t>(state.range(0));
  SchedulerConfig config;
  config.block_size = 16;
  config.max_num_seqs = num_seqs;
  config.max_num_batched_tokens = 16384;
  config.max_model_len = 4096;
  config.num_blocks = num_seqs * ((kPromptLen + kMaxTokens) / 16 + 1);
  Scheduler sched(config);
  std::vector<TokenId> sampled;
  auto refill = [&] {
    fill(sched, num_seqs);
    while (sched.last_output().num_decode_seqs != num_seqs) step(sched, sampled);  // through the prefills
  };
  refill();
  for (auto _ : state) {
    if (!sched.has_unfinished()) {
      state.PauseTiming();
      refill();
      state.ResumeTiming();
    }
    step(sched, sampled);
  }
  state.counters["seqs"] = num_seqs;
}

}  // namespace

BENCHMARK(BM_DecodeStep)->Arg(64)->Arg(256)->Arg(1024)->Unit(benchmark::kMicrosecond);
BENCHMARK_MAIN();
