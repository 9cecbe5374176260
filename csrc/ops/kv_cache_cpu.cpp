// CPU adapter of store_kv_cache: checks, dtype dispatch, one token per loop step.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/checks.h"
#include "pnl/kernels/cpu/kv_cache.h"

namespace pnl::ops {

// key, value [T, Hkv, D] (rows may be strided: slices of the fused qkv output); k_cache, v_cache
// [num_blocks, block_size, Hkv, D]; slot_mapping [T] int32, -1 = skip.
void store_kv_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                        const at::Tensor& slot_mapping) {
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

  const int64_t num_tokens = key.size(0), num_kv_heads = key.size(1), head_dim = key.size(2);
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int32_t* slots = slot_mapping.data_ptr<int32_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(slots[t] >= -1 && slots[t] < num_slots, "slot_mapping[", t, "] = ", slots[t],
                " is out of range [-1, ", num_slots, ") for a cache of ", k_cache.size(0), " blocks of ",
                k_cache.size(1), " tokens");
  }

  const int64_t slot_size = num_kv_heads * head_dim;
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(2 * slot_size, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "store_kv_cache_cpu", [&] {
    const scalar_t* k = key.data_ptr<scalar_t>();
    const scalar_t* v = value.data_ptr<scalar_t>();
    scalar_t* k_out = k_cache.data_ptr<scalar_t>();
    scalar_t* v_out = v_cache.data_ptr<scalar_t>();
    at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        if (slots[t] < 0) continue;
        kernels::cpu::store_kv_token(k + t * key.stride(0), key.stride(1), v + t * value.stride(0), value.stride(1),
                                     k_out + slots[t] * slot_size, v_out + slots[t] * slot_size, num_kv_heads,
                                     head_dim);
      }
    });
  });
}

}  // namespace pnl::ops

TORCH_LIBRARY_IMPL(pnl, CPU, m) { m.impl("store_kv_cache", &pnl::ops::store_kv_cache_cpu); }
