// The float32 FMA peak of this machine: the bound every CPU matmul here lives under
// (benchmarks/throughput.py compares the workload's matmul floor against 5x transformers).
// Each thread runs 12 independent chains of FMAs as wide as the best instruction set of the CPU
// kernels that the CPU runs (AVX-512, AVX2 or SSE2; PNL_CPU_ISA picks another), enough to hide the
// FMA latency on two pipes.
//
//     [PNL_CPU_ISA=avx2] build/<tag>/fma_peak [threads]    (default: every hardware thread)
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr int kChains = 12;
constexpr long kIterations = 200'000'000L;

/// Where each thread leaves its chains' sum, so the compiler cannot drop the work.
std::atomic<float> g_sink{0};

template <int Lanes>
struct VecOf {
  typedef float type __attribute__((vector_size(Lanes * sizeof(float))));
};

/// `iterations` steps of kChains chains of Lanes-wide FMAs; returns their sum. Inlined into a
/// function compiled for the instruction set that has such vectors.
template <int Lanes>
[[gnu::always_inline]] inline float chains(long iterations) {
  using V = typename VecOf<Lanes>::type;
  V acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = V{} + (1.0f + 1e-3f * c);
  const V scale = V{} + 0.999999f, shift = V{} + 1e-7f;
  for (long i = 0; i < iterations; ++i) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * scale + shift;
  }
  float sum = 0;
  for (int c = 0; c < kChains; ++c) {
    for (int l = 0; l < Lanes; ++l) sum += acc[c][l];
  }
  return sum;
}

#if defined(__x86_64__)
[[gnu::target("arch=x86-64-v4")]] float chains_avx512(long iterations) { return chains<16>(iterations); }
[[gnu::target("arch=x86-64-v3")]] float chains_avx2(long iterations) { return chains<8>(iterations); }
#endif
float chains_baseline(long iterations) { return chains<4>(iterations); }

struct Isa {
  const char* name;
  int lanes;
  float (*chains)(long);
};

/// The best set this CPU runs, or PNL_CPU_ISA's if the CPU runs that.
Isa chosen_isa() {
  const char* wanted = std::getenv("PNL_CPU_ISA");
  const auto allowed = [&](const char* name) {
    return wanted == nullptr || *wanted == 0 || std::strcmp(wanted, name) == 0;
  };
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4") && allowed("avx512")) return {"avx512", 16, chains_avx512};
  if (__builtin_cpu_supports("x86-64-v3") && allowed("avx2")) return {"avx2", 8, chains_avx2};
#endif
  return {"baseline", 4, chains_baseline};
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : static_cast<int>(std::thread::hardware_concurrency());
  if (threads < 1) {
    std::fprintf(stderr, "usage: %s [threads >= 1]\n", argv[0]);
    return 2;
  }
  const Isa isa = chosen_isa();
  std::vector<double> rates;
  for (int run = 0; run < 5; ++run) {
    const auto start = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&] { g_sink.store(isa.chains(kIterations), std::memory_order_relaxed); });
    }
    for (auto& t : pool) t.join();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    rates.push_back(2.0 * isa.lanes * kChains * kIterations * threads / seconds);  // an FMA is 2 FLOP
  }
  std::sort(rates.begin(), rates.end());
  std::printf("fp32 FMA peak, %d thread(s), %s (%d lanes): %.1f GFLOP/s (median of 5; min %.1f, max %.1f)\n",
              threads, isa.name, isa.lanes, rates[2] / 1e9, rates[0] / 1e9, rates[4] / 1e9);
}
