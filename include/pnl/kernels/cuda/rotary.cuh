// rotary_embedding on the GPU, neox layout: one pass over q and k, 16-byte loads where heads are
// aligned. Torch-free; T is the q/k type, C the cos/sin cache type (T or float), P the position
// type (int32_t or int64_t).
//
// A position outside [0, max_position) is not checked on the host (that would sync): its token is
// left unrotated, and the cache is never read out of bounds.
#pragma once

#include "pnl/kernels/cuda/common.cuh"
#include "pnl/kernels/rows.h"

namespace pnl::kernels::cuda {

/// Rotates kVec neox pairs (x1[j], x2[j]) by the angles whose cos/sin are cos[j], sin[j]:
/// (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), each output rounded once to T.
template <typename T, typename C, int kVec>
__device__ __forceinline__ void rotate_pairs(T* x1, T* x2,  // [kVec] each, in registers
                                             const C* __restrict cos, const C* __restrict sin) {
  using A = acc_t<T>;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const A a = to_acc(x1[j]), b = to_acc(x2[j]);
    const A c = static_cast<A>(to_acc(cos[j])), s = static_cast<A>(to_acc(sin[j]));
    x1[j] = from_acc<T>(a * c - b * s);
    x2[j] = from_acc<T>(b * c + a * s);
  }
}

/// Whether position `pos` has a row in a cache of max_position rows.
template <typename P>
__device__ __forceinline__ bool position_in_range(P pos, int64_t max_position) {
  return pos >= 0 && static_cast<int64_t>(pos) < max_position;
}

/// grid.x * blockDim.y tokens, one per threadIdx.y; threadIdx.x walks the token's (head, pair)
/// items, kVec pairs each. q/k heads are Rows: inner = heads, outer_stride = token stride,
/// inner_stride = head stride.
template <typename T, typename C, typename P, int kVec>
__global__ void rotary_embedding_kernel(const P* __restrict positions,      // [T]
                                        T* query, T* key,                   // [T, H, D], [T, Hkv, D]
                                        const C* __restrict cos_sin_cache,  // [max_position, 2 * half]
                                        Rows q_heads, Rows k_heads, int64_t num_tokens, int half,
                                        int64_t max_position) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (t >= num_tokens) return;
  const P pos = positions[t];
  if (!position_in_range(pos, max_position)) return;
  const C* cos = cos_sin_cache + static_cast<int64_t>(pos) * (2 * half);
  const C* sin = cos + half;
  const int pairs = half / kVec, num_q = static_cast<int>(q_heads.inner);
  const int items = (num_q + static_cast<int>(k_heads.inner)) * pairs;
  for (int w = threadIdx.x; w < items; w += blockDim.x) {
    const int h = w / pairs, i = (w % pairs) * kVec;
    T* x = h < num_q ? query + t * q_heads.outer_stride + h * q_heads.inner_stride
                     : key + t * k_heads.outer_stride + (h - num_q) * k_heads.inner_stride;
    T x1[kVec], x2[kVec];
    load_vec(x1, x + i);
    load_vec(x2, x + half + i);
    rotate_pairs<T, C, kVec>(x1, x2, cos + i, sin + i);
    store_vec(x + i, x1);
    store_vec(x + half + i, x2);
  }
}

template <typename T, typename C, typename P>
cudaError_t rotary_embedding(const P* positions, T* query, T* key, const C* cos_sin_cache, Rows q_heads,
                             Rows k_heads, int64_t num_tokens, int64_t rot_dim, int64_t max_position,
                             cudaStream_t stream) {
  const int64_t half = rot_dim / 2;
  if (num_tokens == 0 || half == 0 || q_heads.inner + k_heads.inner == 0) return cudaSuccess;
  constexpr int kV = Vec16<T>::kSize;
  const bool vec = aligned16(query, half, q_heads.outer_stride) && aligned16(query, half, q_heads.inner_stride) &&
                   aligned16(key, half, k_heads.outer_stride) && aligned16(key, half, k_heads.inner_stride);
  const dim3 block = token_block((q_heads.inner + k_heads.inner) * (vec ? half / kV : half));
  const unsigned grid = static_cast<unsigned>(ceil_div(num_tokens, block.y));
  if (vec) {
    rotary_embedding_kernel<T, C, P, kV><<<grid, block, 0, stream>>>(
        positions, query, key, cos_sin_cache, q_heads, k_heads, num_tokens, static_cast<int>(half), max_position);
  } else {
    rotary_embedding_kernel<T, C, P, 1><<<grid, block, 0, stream>>>(
        positions, query, key, cos_sin_cache, q_heads, k_heads, num_tokens, static_cast<int>(half), max_position);
  }
  return cudaGetLastError();
}

}  // namespace pnl::kernels::cuda
