// qk_norm_rope_store on the GPU: Qwen3's attention front end in one pass. Each q or k head is
// RMS-normalised over head_dim, rounded to T (as the separate rms_norm op stores it), rotated
// (neox, the first rot_dim dims) and written back in place; each k head, with its v head, is also
// copied into the token's KV-cache slot. Torch-free.
//
// One group of `group` lanes (a power of two, at most 32) per (token, head) unit; units are the
// H query heads then the Hkv key heads of each token. Lane l owns the neox pairs l, l + group, ...
// (kVec dims at i and at half + i) and the tail chunks past rot_dim the same way, in both sweeps,
// so no barrier is needed besides the group's shuffle reduction.
//
// Out-of-range positions and slots are not checked on the host (a sync): such a token is
// normalised but left unrotated, or not stored; nothing is accessed out of bounds.
#pragma once

#include "pnl/kernels/cuda/common.cuh"
#include "pnl/kernels/cuda/kv_cache.cuh"
#include "pnl/kernels/cuda/norm.cuh"
#include "pnl/kernels/cuda/rotary.cuh"
#include "pnl/kernels/rows.h"

namespace pnl::kernels::cuda {

struct QkNormRopeStoreArgs {
  Rows q_heads, k_heads, v_heads;  // inner = heads, outer_stride = token stride, inner_stride = head stride
  int64_t num_tokens;
  int head_dim, half;  // half = rot_dim / 2
  int64_t max_position, num_slots;
  double eps;
  int group;  // lanes per unit
};

template <typename T, int kVec>
__device__ __forceinline__ void normalize(T (&x)[kVec], acc_t<T> inv, const T* __restrict weight) {
  T w[kVec];
  load_vec(w, weight);
#pragma unroll
  for (int j = 0; j < kVec; ++j) x[j] = normed(x[j], inv, w[j]);
}

template <typename T, int kVec>
__device__ __forceinline__ acc_t<T> sum_of_squares(const T (&x)[kVec]) {
  acc_t<T> sum = 0;
#pragma unroll
  for (int j = 0; j < kVec; ++j) sum += to_acc(x[j]) * to_acc(x[j]);
  return sum;
}

template <typename T, typename C, typename P, int kVec>
__global__ void qk_norm_rope_store_kernel(const P* __restrict positions,  // [T]
                                          T* query,                       // [T, H, D]
                                          T* key,                         // [T, Hkv, D]
                                          const T* __restrict value,      // [T, Hkv, D]
                                          const T* __restrict q_weight,   // [D]
                                          const T* __restrict k_weight,   // [D]
                                          const C* __restrict cos_sin_cache,  // [max_position, 2 * half]
                                          T* __restrict k_cache,          // [num_slots, Hkv, D]
                                          T* __restrict v_cache,          // [num_slots, Hkv, D]
                                          const int32_t* __restrict slot_mapping,  // [T]
                                          QkNormRopeStoreArgs a) {
  using A = acc_t<T>;
  const int num_q = static_cast<int>(a.q_heads.inner), num_kv = static_cast<int>(a.k_heads.inner);
  const int64_t unit = int64_t(blockIdx.x) * (blockDim.x / a.group) + threadIdx.x / a.group;
  const int lane = threadIdx.x % a.group;
  const bool valid = unit < a.num_tokens * (num_q + num_kv);  // an idle group still joins the reduction
  const int64_t t = valid ? unit / (num_q + num_kv) : 0;
  const int h = valid ? static_cast<int>(unit % (num_q + num_kv)) : 0;
  const bool is_key = h >= num_q;
  T* x = is_key ? key + t * a.k_heads.outer_stride + (h - num_q) * a.k_heads.inner_stride
                : query + t * a.q_heads.outer_stride + h * a.q_heads.inner_stride;
  const int pairs = valid ? a.half / kVec : 0, rot_dim = 2 * a.half;
  const int tail = valid ? (a.head_dim - rot_dim) / kVec : 0;

  A sum = 0;
  for (int p = lane; p < pairs; p += a.group) {
    T x1[kVec], x2[kVec];
    load_vec(x1, x + p * kVec);
    load_vec(x2, x + a.half + p * kVec);
    sum += sum_of_squares(x1) + sum_of_squares(x2);
  }
  for (int c = lane; c < tail; c += a.group) {
    T x3[kVec];
    load_vec(x3, x + rot_dim + c * kVec);
    sum += sum_of_squares(x3);
  }
  const A inv = inv_rms(group_sum(sum, a.group), a.head_dim, a.eps);
  if (!valid) return;  // past the only shuffle: the rest needs no other lane

  const T* weight = is_key ? k_weight : q_weight;
  const P pos = positions[t];
  const bool rotate = position_in_range(pos, a.max_position);
  const C* cos = cos_sin_cache + (rotate ? static_cast<int64_t>(pos) * rot_dim : 0);
  const C* sin = cos + a.half;
  int32_t slot = -1;
  if (is_key) slot = slot_mapping[t];
  const bool store = is_key && slot_in_range(slot, a.num_slots);
  const int64_t slot_head = store ? (static_cast<int64_t>(slot) * num_kv + (h - num_q)) * a.head_dim : 0;

  for (int p = lane; p < pairs; p += a.group) {
    const int i = p * kVec;
    T x1[kVec], x2[kVec];
    load_vec(x1, x + i);  // this thread's own first-sweep loads, from L1
    load_vec(x2, x + a.half + i);
    normalize(x1, inv, weight + i);
    normalize(x2, inv, weight + a.half + i);
    if (rotate) rotate_pairs<T, C, kVec>(x1, x2, cos + i, sin + i);
    store_vec(x + i, x1);
    store_vec(x + a.half + i, x2);
    if (store) {
      store_vec(k_cache + slot_head + i, x1);
      store_vec(k_cache + slot_head + a.half + i, x2);
    }
  }
  for (int c = lane; c < tail; c += a.group) {
    const int i = rot_dim + c * kVec;
    T x3[kVec];
    load_vec(x3, x + i);
    normalize(x3, inv, weight + i);
    store_vec(x + i, x3);
    if (store) store_vec(k_cache + slot_head + i, x3);
  }
  if (store) {
    const T* v = value + t * a.v_heads.outer_stride + (h - num_q) * a.v_heads.inner_stride;
    for (int c = lane; c < a.head_dim / kVec; c += a.group) {
      T vx[kVec];
      load_vec(vx, v + c * kVec);
      store_vec(v_cache + slot_head + c * kVec, vx);
    }
  }
}

template <typename T, typename C, typename P>
cudaError_t qk_norm_rope_store(const P* positions, T* query, T* key, const T* value, const T* q_weight,
                               const T* k_weight, const C* cos_sin_cache, T* k_cache, T* v_cache,
                               const int32_t* slot_mapping, QkNormRopeStoreArgs args, cudaStream_t stream) {
  const int64_t units = args.num_tokens * (args.q_heads.inner + args.k_heads.inner);
  if (units == 0 || args.head_dim == 0) return cudaSuccess;
  constexpr int kV = Vec16<T>::kSize;
  const int64_t d = args.head_dim;
  const bool vec = aligned16(query, d, args.q_heads.outer_stride) && aligned16(query, d, args.q_heads.inner_stride) &&
                   aligned16(key, d, args.k_heads.outer_stride) && aligned16(key, d, args.k_heads.inner_stride) &&
                   aligned16(value, d, args.v_heads.outer_stride) && aligned16(value, d, args.v_heads.inner_stride) &&
                   aligned16(q_weight, d) && aligned16(k_weight, d) && aligned16(k_cache, d) &&
                   aligned16(v_cache, d) && args.half % kV == 0;
  // About two kVec-chunks of the head per lane.
  const int64_t chunks = ceil_div(d, vec ? kV : 1);
  args.group = 1;
  while (args.group < ceil_div(chunks, 2) && args.group < 32) args.group *= 2;
  constexpr int kThreads = 256;
  const unsigned grid = static_cast<unsigned>(ceil_div(units, kThreads / args.group));
  if (vec) {
    qk_norm_rope_store_kernel<T, C, P, kV><<<grid, kThreads, 0, stream>>>(
        positions, query, key, value, q_weight, k_weight, cos_sin_cache, k_cache, v_cache, slot_mapping, args);
  } else {
    qk_norm_rope_store_kernel<T, C, P, 1><<<grid, kThreads, 0, stream>>>(
        positions, query, key, value, q_weight, k_weight, cos_sin_cache, k_cache, v_cache, slot_mapping, args);
  }
  return cudaGetLastError();
}

}  // namespace pnl::kernels::cuda
