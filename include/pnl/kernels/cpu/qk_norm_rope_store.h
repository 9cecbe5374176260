// Qwen3's attention front end for one token: q/k RMSNorm per head, neox rotary, KV-cache store.
// Torch-free; T is float, double, c10::Half or c10::BFloat16, C (the cos/sin cache) is T or float.
//
// Built from the row helpers of the separate ops, in their order, so the result is the same bits
// as rms_norm (rounded to T), then rotary_embedding, then store_kv_cache.
#pragma once

#include <cstdint>

#include "pnl/kernels/cpu/kv_cache.h"
#include "pnl/kernels/cpu/norm.h"
#include "pnl/kernels/cpu/rotary.h"

namespace pnl::kernels::cpu {
inline namespace PNL_CPU_ISA {

/// The heads of one token of a [T, heads, head_dim] tensor.
template <typename T>
struct TokenHeads {
  T* data;
  int64_t stride;  // elements between heads
  int64_t count;
};

/// Normalises and rotates q and k in place; when k_slot is not null, copies k and v into the slot.
template <typename T, typename C>
inline void qk_norm_rope_store_token(TokenHeads<T> q, TokenHeads<T> k, TokenHeads<const T> v,
                                     const T* __restrict q_weight,  // [head_dim]
                                     const T* __restrict k_weight,  // [head_dim]
                                     double eps, int64_t head_dim,
                                     const C* __restrict cos_sin,  // [2 * half]: cos, then sin, of this position
                                     int64_t half,
                                     T* k_slot,  // [Hkv, head_dim], contiguous, or null
                                     T* v_slot) {
  for (int64_t h = 0; h < q.count; ++h) {
    T* x = q.data + h * q.stride;
    rms_norm_row(x, x, q_weight, head_dim, eps);
  }
  for (int64_t h = 0; h < k.count; ++h) {
    T* x = k.data + h * k.stride;
    rms_norm_row(x, x, k_weight, head_dim, eps);
  }
  rotary_embedding_token(q.data, q.stride, q.count, cos_sin, half);
  rotary_embedding_token(k.data, k.stride, k.count, cos_sin, half);
  if (k_slot != nullptr) store_kv_token(k.data, k.stride, v.data, v.stride, k_slot, v_slot, k.count, head_dim);
}

}  // namespace PNL_CPU_ISA
}  // namespace pnl::kernels::cpu
