// Helpers shared by the CPU kernels: the accumulation type, an exp that vectorizes, and reductions
// split over lanes. Torch-free: T is float, double, c10::Half or c10::BFloat16 (the last two
// convert to and from float implicitly).
//
// The kernels are compiled once per instruction set (CMakeLists.txt, PNL_CPU_ISAS), each copy in an
// inline namespace named after its set, so that no two copies share a symbol the linker could
// merge: an AVX-512 copy must never stand in for the one an AVX2 CPU runs.
//
// GCC vectorizes a float reduction only when told it may reassociate (-ffast-math), which we do not
// pass; so sums and maxima keep kLanes independent partial results, one SIMD register's worth, and
// combine them at the end.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#ifndef PNL_CPU_ISA
#error "the CPU kernels are compiled per instruction set: define PNL_CPU_ISA (baseline, avx2 or avx512)"
#endif

namespace pnl::kernels::cpu {
inline namespace PNL_CPU_ISA {

/// float for float, half and bfloat16; double for double (so tests can use a float64 oracle).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

/// Bytes of the widest SIMD register of the instruction set compiled for, and how many such
/// registers it has: register tiles are sized so their sums fit the register file.
#if defined(__AVX512F__)
inline constexpr int kVectorBytes = 64;
inline constexpr int kVectorRegisters = 32;
#elif defined(__AVX__)
inline constexpr int kVectorBytes = 32;
inline constexpr int kVectorRegisters = 16;
#elif defined(__aarch64__)
inline constexpr int kVectorBytes = 16;  // NEON
inline constexpr int kVectorRegisters = 32;
#else
inline constexpr int kVectorBytes = 16;  // SSE2
inline constexpr int kVectorRegisters = 16;
#endif

/// floats per SIMD register: the partial results of a lane-split reduction, and the width of the
/// register tiles that run along head_dim.
inline constexpr int kLanes = kVectorBytes / static_cast<int>(sizeof(float));

/// exp(x) to about 2 ulp, in plain arithmetic so loops of it vectorize (a call to expf does not):
/// exp(x) = 2^n * exp(r) with n = round(x / ln 2), |r| <= ln 2 / 2 and Cephes' expf polynomial.
/// Returns 0 below -87.3 (where float would go subnormal) and saturates at 88.3.
inline float exp_approx(float x) {
  const bool underflow = x < -87.33f;
  x = x > 88.3f ? 88.3f : x;
  x = x < -87.33f ? -87.33f : x;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + round_magic) - round_magic;
  const float r = x - n * 0.693359375f - n * -2.12194440e-4f;  // x - n ln 2, in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? 0.0f : p * scale;
}

/// The float64 path is the test oracle's precision, not a fast path.
inline double exp_approx(double x) { return std::exp(x); }

/// log(x) for finite x > 0 to about 2 ulp, in plain arithmetic so loops of it vectorize:
/// log(x) = e ln 2 + log(m) with x = m 2^e, m in [sqrt(1/2), sqrt(2)), and Cephes' logf polynomial.
inline float log_approx(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  float e = static_cast<float>((bits >> 23) - 127);
  bits = (bits & 0x007FFFFF) | 0x3F800000;  // m in [1, 2)
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool halve = m > 1.41421356f;
  m = halve ? m * 0.5f : m;
  e = halve ? e + 1.0f : e;
  const float f = m - 1.0f, f2 = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float y = p * f * f2 + e * -2.12194440e-4f - 0.5f * f2;
  return f + y + e * 0.693359375f;  // e ln 2 in two parts, as exp_approx
}

inline double log_approx(double x) { return std::log(x); }

/// sum(x[i]^2) for i < n, accumulated in Acc.
template <typename Acc, typename T>
inline Acc sum_of_squares(const T* __restrict x, int64_t n) {  // x [n]
  Acc lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const Acc v = static_cast<Acc>(x[i + j]);
      lanes[j] += v * v;
    }
  }
  for (; i < n; ++i) {
    const Acc v = static_cast<Acc>(x[i]);
    lanes[i % kLanes] += v * v;
  }
  Acc total = 0;
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

/// N lanes of Acc as one GCC/Clang vector (lowered to the widest SIMD the target has). Used for the
/// register tiles of attention, where a loop over lanes inside a loop that carries the sums is
/// vectorised unreliably (GCC may vectorise the outer loop instead).
template <typename Acc, int N>
struct VecOf {
  typedef Acc type __attribute__((vector_size(N * sizeof(Acc))));
};
template <typename Acc, int N>
using Vec = typename VecOf<Acc, N>::type;

// A vector wider than the target's registers travels through memory, and GCC notes that this ABI
// once changed (-Wpsabi); these helpers are always inlined, so no call crosses an ABI boundary.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename V, typename Acc>
inline V load_vec(const Acc* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename Acc>
inline void store_vec(Acc* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}
#pragma GCC diagnostic pop

/// Asks for the cache line at p into L2. The empty asm statement keeps it: GCC deems
/// __builtin_prefetch free of side effects, so its IPA pass marks a function that only prefetches
/// "const" and deletes every call to it (that once left _C without a single prefetch instruction).
/// The asm is a side effect and emits no code.
inline void prefetch_l2(const void* p) {
  __builtin_prefetch(p, 0, 2);
  asm volatile("");
}

/// x rounded up to a multiple of m.
inline constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace PNL_CPU_ISA
}  // namespace pnl::kernels::cpu
