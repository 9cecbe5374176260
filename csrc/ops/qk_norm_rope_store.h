// Argument checks of qk_norm_rope_store, shared by its CPU and CUDA adapters: those of rms_norm's
// weight, rotary_embedding and store_kv_cache, plus the [T, heads, D] layout of query and key.
#pragma once

#include "ops/kv_cache.h"
#include "ops/norm.h"
#include "ops/rotary.h"

namespace pnl::ops {

/// positions [T]; query [T, H, D]; key, value [T, Hkv, D] (rows may be strided: slices of the fused
/// qkv output); q_weight, k_weight [D]; cos_sin_cache [max_position, rot_dim]; k_cache, v_cache
/// [num_blocks, block_size, Hkv, D]; slot_mapping [T]. Reads neither positions nor slot_mapping.
inline RotaryShape check_qk_norm_rope_store(const at::Tensor& positions, const at::Tensor& query,
                                            const at::Tensor& key, const at::Tensor& value,
                                            const at::Tensor& q_weight, const at::Tensor& k_weight,
                                            const at::Tensor& cos_sin_cache, const at::Tensor& k_cache,
                                            const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(query.dim() == 3, "query must be [num_tokens, num_heads, head_dim], got shape ", query.sizes());
  TORCH_CHECK(key.dim() == 3, "key must be [num_tokens, num_kv_heads, head_dim], got shape ", key.sizes());
  const RotaryShape shape = check_rotary_embedding(positions, query, key, cos_sin_cache, query.size(2));
  check_norm_weight(q_weight, "q_weight", query, "query");
  check_norm_weight(k_weight, "k_weight", key, "key");
  check_store_kv_cache(key, value, k_cache, v_cache, slot_mapping);
  return shape;
}

}  // namespace pnl::ops
