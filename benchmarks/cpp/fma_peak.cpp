// The float32 FMA peak of this build on this machine: the bound every CPU matmul here lives under
// (benchmarks/throughput.py compares the workload's matmul floor against 5x transformers).
// Each thread runs 12 independent chains of kLanes-wide FMAs, enough to hide the FMA latency on
// two pipes, on the SIMD width the CPU kernels are compiled for.
//
//     build/<tag>/fma_peak [threads]    (default: every hardware thread)
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "pnl/kernels/cpu/common.h"

namespace {

using pnl::kernels::cpu::kLanes;
using V = pnl::kernels::cpu::Vec<float, kLanes>;

constexpr int kChains = 12;
constexpr long kIterations = 200'000'000L;

/// Where each thread leaves its chains' sum, so the compiler cannot drop the work.
std::atomic<float> g_sink{0};

/// `iterations` steps of kChains FMA chains; returns their sum.
float chains(long iterations) {
  V acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = V{} + (1.0f + 1e-3f * c);
  const V scale = V{} + 0.999999f, shift = V{} + 1e-7f;
  for (long i = 0; i < iterations; ++i) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * scale + shift;
  }
  float sum = 0;
  for (int c = 0; c < kChains; ++c) {
    for (int l = 0; l < kLanes; ++l) sum += acc[c][l];
  }
  return sum;
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : static_cast<int>(std::thread::hardware_concurrency());
  if (threads < 1) {
    std::fprintf(stderr, "usage: %s [threads >= 1]\n", argv[0]);
    return 2;
  }
  std::vector<double> rates;
  for (int run = 0; run < 5; ++run) {
    const auto start = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([] { g_sink.store(chains(kIterations), std::memory_order_relaxed); });
    }
    for (auto& t : pool) t.join();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    rates.push_back(2.0 * kLanes * kChains * kIterations * threads / seconds);  // an FMA is 2 FLOP
  }
  std::sort(rates.begin(), rates.end());
  std::printf("fp32 FMA peak, %d thread(s), %d lanes: %.1f GFLOP/s (median of 5; min %.1f, max %.1f)\n", threads,
              kLanes, rates[2] / 1e9, rates[0] / 1e9, rates[4] / 1e9);
}
