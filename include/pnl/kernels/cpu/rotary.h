// Rotary position embedding, neox layout. Torch-free; T is float, double, c10::Half or
// c10::BFloat16, C (the cos/sin cache) is T or float.
//
// Neox pairs dim i with dim i + rot_dim / 2 of the same head:
//   (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin);  dims past rot_dim are untouched.
#pragma once

#include <cstdint>

#include "pnl/kernels/cpu/common.h"

namespace pnl::kernels::cpu {
inline namespace PNL_CPU_ISA {

/// Rotates the first 2 * half dims of num_heads heads of one token, in place.
template <typename T, typename C>
inline void rotary_embedding_token(T* x,                       // [num_heads, head_size], heads head_stride apart
                                   int64_t head_stride, int64_t num_heads,
                                   const C* __restrict cos_sin,  // [2 * half]: cos, then sin, of this position
                                   int64_t half) {
  using Acc = acc_t<T>;
  const C* __restrict cos = cos_sin;
  const C* __restrict sin = cos_sin + half;
  for (int64_t h = 0; h < num_heads; ++h) {
    T* __restrict x1 = x + h * head_stride;
    T* __restrict x2 = x1 + half;
    for (int64_t i = 0; i < half; ++i) {
      const Acc a = static_cast<Acc>(x1[i]), b = static_cast<Acc>(x2[i]);
      const Acc c = static_cast<Acc>(cos[i]), s = static_cast<Acc>(sin[i]);
      x1[i] = static_cast<T>(a * c - b * s);
      x2[i] = static_cast<T>(b * c + a * s);
    }
  }
}

}  // namespace PNL_CPU_ISA
}  // namespace pnl::kernels::cpu
