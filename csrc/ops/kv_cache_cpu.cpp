// CPU adapter of store_kv_cache: checks, dtype dispatch, one token per loop step.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "ops/cpu_ops.h"
#include "ops/kv_cache.h"
#include "pnl/kernels/cpu/kv_cache.h"

namespace pnl::ops::PNL_CPU_ISA {

void store_kv_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                        const at::Tensor& slot_mapping) {
  check_store_kv_cache(key, value, k_cache, v_cache, slot_mapping);
  check_slots_in_range(slot_mapping, k_cache);
  const int64_t num_tokens = key.size(0), num_kv_heads = key.size(1), head_dim = key.size(2);
  const int32_t* slots = slot_mapping.data_ptr<int32_t>();
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

}  // namespace pnl::ops::PNL_CPU_ISA
