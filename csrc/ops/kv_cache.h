// Argument checks of store_kv_cache, shared by its CPU and CUDA adapters (and by
// qk_norm_rope_store, which stores the same way).
#pragma once

#include "ops/checks.h"

namespace pnl::ops {

/// key, value [T, Hkv, D] (rows may be strided: slices of the fused qkv output); k_cache, v_cache
/// [num_blocks, block_size, Hkv, D], contiguous; slot_mapping [T] int32. Does not read
/// slot_mapping (see check_slots_in_range).
inline void check_store_kv_cache(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  check_rows(key, "key");
  check_rows(value, "value");
  TORCH_CHECK(key.dim() == 3, "key must be [num_tokens, num_kv_heads, head_dim], got shape ", key.sizes());
  TORCH_CHECK(value.sizes() == key.sizes(), "value must have key's shape ", key.sizes(), ", got ", value.sizes());
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got ",
              "shape ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have k_cache's shape ", k_cache.sizes(), ", got ",
              v_cache.sizes());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "k_cache and v_cache must be contiguous");
  TORCH_CHECK(k_cache.size(2) == key.size(1) && k_cache.size(3) == key.size(2), "k_cache [num_blocks, block_size, ",
              k_cache.size(2), ", ", k_cache.size(3), "] does not fit key heads [", key.size(1), ", ", key.size(2),
              "]");
  check_same(key, "key", value, "value");
  check_same(key, "key", k_cache, "k_cache");
  check_same(key, "key", v_cache, "v_cache");
  check_index(slot_mapping, "slot_mapping", 1);
  check_device(slot_mapping, "slot_mapping", key, "key");
  TORCH_CHECK(slot_mapping.size(0) == key.size(0), "slot_mapping must have one slot per token (", key.size(0),
              "), got ", slot_mapping.size(0));
}

/// CPU only (reads slot_mapping on the host; the CUDA kernels skip a slot out of range instead, so
/// they never sync): every slot is -1 or addresses the cache.
inline void check_slots_in_range(const at::Tensor& slot_mapping, const at::Tensor& k_cache) {
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int32_t* slots = slot_mapping.data_ptr<int32_t>();
  for (int64_t t = 0; t < slot_mapping.size(0); ++t) {
    TORCH_CHECK(slots[t] >= -1 && slots[t] < num_slots, "slot_mapping[", t, "] = ", slots[t],
                " is out of range [-1, ", num_slots, ") for a cache of ", k_cache.size(0), " blocks of ",
                k_cache.size(1), " tokens");
  }
}

}  // namespace pnl::ops
