// store_kv_cache on the GPU: each new token's K and V heads copied into its cache slot, 16 bytes
// per thread where heads are aligned. Torch-free.
//
// Cache layout [num_blocks, block_size, Hkv, D]: slot s is the contiguous [Hkv, D] row at
// s * Hkv * D. Slot -1 is skipped; so is any slot past the cache, which the CUDA adapter cannot
// check without reading slot_mapping on the host (a sync), so nothing is written out of bounds.
#pragma once

#include "pnl/kernels/cuda/common.cuh"
#include "pnl/kernels/rows.h"

namespace pnl::kernels::cuda {

/// Whether slot addresses one of num_slots cache rows (-1, the skip marker, does not).
__device__ __forceinline__ bool slot_in_range(int32_t slot, int64_t num_slots) {
  return slot >= 0 && static_cast<int64_t>(slot) < num_slots;
}

/// grid.x * blockDim.y tokens, one per threadIdx.y; threadIdx.x walks the token's (head, chunk)
/// items, kVec elements each. key/value heads are Rows (inner = Hkv, outer_stride = token stride,
/// inner_stride = head stride).
template <typename T, int kVec>
__global__ void store_kv_cache_kernel(const T* __restrict key, const T* __restrict value,  // [T, Hkv, D]
                                      T* __restrict k_cache, T* __restrict v_cache,        // [slots, Hkv, D]
                                      const int32_t* __restrict slot_mapping,              // [T]
                                      Rows k_heads, Rows v_heads, int64_t num_tokens, int head_dim,
                                      int64_t num_slots) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (t >= num_tokens) return;
  const int32_t slot = slot_mapping[t];
  if (!slot_in_range(slot, num_slots)) return;
  const int num_heads = static_cast<int>(k_heads.inner), chunks = head_dim / kVec;
  const int64_t slot_offset = static_cast<int64_t>(slot) * num_heads * head_dim;
  const T* k = key + t * k_heads.outer_stride;
  const T* v = value + t * v_heads.outer_stride;
  for (int w = threadIdx.x; w < num_heads * chunks; w += blockDim.x) {
    const int h = w / chunks, i = (w % chunks) * kVec;
    T kx[kVec], vx[kVec];
    load_vec(kx, k + h * k_heads.inner_stride + i);
    load_vec(vx, v + h * v_heads.inner_stride + i);
    const int64_t dst = slot_offset + int64_t(h) * head_dim + i;
    store_vec(k_cache + dst, kx);
    store_vec(v_cache + dst, vx);
  }
}

template <typename T>
cudaError_t store_kv_cache(const T* key, const T* value, T* k_cache, T* v_cache, const int32_t* slot_mapping,
                           Rows k_heads, Rows v_heads, int64_t num_tokens, int64_t head_dim, int64_t num_slots,
                           cudaStream_t stream) {
  if (num_tokens == 0 || head_dim == 0 || k_heads.inner == 0) return cudaSuccess;
  constexpr int kV = Vec16<T>::kSize;
  const bool vec = aligned16(key, head_dim, k_heads.outer_stride) && aligned16(key, head_dim, k_heads.inner_stride) &&
                   aligned16(value, head_dim, v_heads.outer_stride) &&
                   aligned16(value, head_dim, v_heads.inner_stride) && aligned16(k_cache, head_dim) &&
                   aligned16(v_cache, head_dim);
  const dim3 block = token_block(k_heads.inner * (vec ? head_dim / kV : head_dim));
  const unsigned grid = static_cast<unsigned>(ceil_div(num_tokens, block.y));
  if (vec) {
    store_kv_cache_kernel<T, kV><<<grid, block, 0, stream>>>(key, value, k_cache, v_cache, slot_mapping, k_heads,
                                                              v_heads, num_tokens, static_cast<int>(head_dim),
                                                              num_slots);
  } else {
    store_kv_cache_kernel<T, 1><<<grid, block, 0, stream>>>(key, value, k_cache, v_cache, slot_mapping, k_heads,
                                                             v_heads, num_tokens, static_cast<int>(head_dim),
                                                             num_slots);
  }
  return cudaGetLastError();
}

}  // namespace pnl::kernels::cuda
