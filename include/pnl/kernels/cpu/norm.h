// RMS normalisation of one row. Torch-free; T is float, double, c10::Half or c10::BFloat16.
// Sums of squares accumulate in fp32 (fp64 for double); each output is rounded once.
#pragma once

#include <cmath>
#include <cstdint>

#include "pnl/kernels/cpu/common.h"

namespace pnl::kernels::cpu {
inline namespace PNL_CPU_ISA {

/// out = in / sqrt(mean(in^2) + eps) * weight. out may be in itself (in place), so no __restrict:
/// each element is read before it is written.
template <typename T>
inline void rms_norm_row(T* out,                     // [hidden]
                         const T* in,                // [hidden]
                         const T* __restrict weight,  // [hidden]
                         int64_t hidden, double eps) {
  using Acc = acc_t<T>;
  const Acc inv_rms =
      Acc(1) / std::sqrt(sum_of_squares<Acc>(in, hidden) / static_cast<Acc>(hidden) + static_cast<Acc>(eps));
  for (int64_t i = 0; i < hidden; ++i) {
    out[i] = static_cast<T>(static_cast<Acc>(in[i]) * inv_rms * static_cast<Acc>(weight[i]));
  }
}

/// residual = x + residual (stored in T); x = rms_norm(residual) * weight. Like vLLM, the
/// normalisation reads the residual as stored, i.e. rounded to T.
template <typename T>
inline void fused_add_rms_norm_row(T* __restrict x,         // [hidden]
                                   T* __restrict residual,  // [hidden]
                                   const T* __restrict weight,  // [hidden]
                                   int64_t hidden, double eps) {
  using Acc = acc_t<T>;
  for (int64_t i = 0; i < hidden; ++i) {
    residual[i] = static_cast<T>(static_cast<Acc>(x[i]) + static_cast<Acc>(residual[i]));
  }
  const Acc inv_rms =
      Acc(1) / std::sqrt(sum_of_squares<Acc>(residual, hidden) / static_cast<Acc>(hidden) + static_cast<Acc>(eps));
  for (int64_t i = 0; i < hidden; ++i) {
    x[i] = static_cast<T>(static_cast<Acc>(residual[i]) * inv_rms * static_cast<Acc>(weight[i]));
  }
}

}  // namespace PNL_CPU_ISA
}  // namespace pnl::kernels::cpu
