// Writing new tokens' K and V into the paged cache. Torch-free; T is any trivially copyable element.
//
// Cache layout [num_blocks, block_size, num_kv_heads, head_dim]: slot = block * block_size + offset
// addresses one token's [num_kv_heads, head_dim] row, contiguous.
#pragma once

#include <cstdint>
#include <cstring>

namespace pnl::kernels::cpu {
inline namespace PNL_CPU_ISA {

/// Copies one token's key and value heads into its cache slot (a plain copy: no dtype change).
template <typename T>
inline void store_kv_token(const T* __restrict key,    // [num_kv_heads, head_dim], heads key_head_stride apart
                           int64_t key_head_stride,
                           const T* __restrict value,  // [num_kv_heads, head_dim], heads value_head_stride apart
                           int64_t value_head_stride,
                           T* __restrict k_slot,       // [num_kv_heads, head_dim], contiguous
                           T* __restrict v_slot,       // [num_kv_heads, head_dim], contiguous
                           int64_t num_kv_heads, int64_t head_dim) {
  const size_t head_bytes = static_cast<size_t>(head_dim) * sizeof(T);
  if (key_head_stride == head_dim) {
    std::memcpy(k_slot, key, head_bytes * num_kv_heads);
  } else {
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      std::memcpy(k_slot + h * head_dim, key + h * key_head_stride, head_bytes);
    }
  }
  if (value_head_stride == head_dim) {
    std::memcpy(v_slot, value, head_bytes * num_kv_heads);
  } else {
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      std::memcpy(v_slot + h * head_dim, value + h * value_head_stride, head_bytes);
    }
  }
}

}  // namespace PNL_CPU_ISA
}  // namespace pnl::kernels::cpu
