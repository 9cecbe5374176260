// Gated activations. Torch-free; T is float, double, c10::Half or c10::BFloat16.
#pragma once

#include <cstdint>

#include "pnl/kernels/cpu/common.h"

namespace pnl::kernels::cpu {
inline namespace PNL_CPU_ISA {

/// out[i] = silu(gate[i]) * up[i] with silu(x) = x / (1 + exp(-x)), in fp32 (fp64 for double),
/// rounded once.
template <typename T>
inline void silu_and_mul_row(T* __restrict out,           // [d]
                             const T* __restrict gate_up,  // [2 * d]: gate, then up
                             int64_t d) {
  using Acc = acc_t<T>;
  const T* __restrict up = gate_up + d;
  for (int64_t i = 0; i < d; ++i) {
    const Acc x = static_cast<Acc>(gate_up[i]);
    out[i] = static_cast<T>(x / (Acc(1) + exp_approx(-x)) * static_cast<Acc>(up[i]));
  }
}

}  // namespace PNL_CPU_ISA
}  // namespace pnl::kernels::cpu
