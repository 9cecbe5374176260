// CPU adapter of qk_norm_rope_store: checks, dtype dispatch, one token per loop step.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "ops/cpu_ops.h"
#include "ops/qk_norm_rope_store.h"
#include "pnl/kernels/cpu/qk_norm_rope_store.h"

namespace pnl::ops::PNL_CPU_ISA {

void qk_norm_rope_store_cpu(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& q_weight, const at::Tensor& k_weight, double eps,
                            const at::Tensor& cos_sin_cache, at::Tensor& k_cache, at::Tensor& v_cache,
                            const at::Tensor& slot_mapping) {
  const RotaryShape shape = check_qk_norm_rope_store(positions, query, key, value, q_weight, k_weight, cos_sin_cache,
                                                     k_cache, v_cache, slot_mapping);
  check_positions_in_range(positions, shape.max_position);
  check_slots_in_range(slot_mapping, k_cache);
  const int64_t num_tokens = shape.num_tokens, head_dim = query.size(2), rot_dim = shape.rot_dim;
  const int64_t num_heads = query.size(1), num_kv_heads = key.size(1), slot_size = num_kv_heads * head_dim;
  const int32_t* slots = slot_mapping.data_ptr<int32_t>();
  const int64_t token_work = std::max<int64_t>(1, (num_heads + 2 * num_kv_heads) * head_dim);
  const int64_t grain = std::max<int64_t>(1, kGrainSize / token_work);  // tokens per chunk
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "qk_norm_rope_store_cpu", [&] {
    using T = scalar_t;
    dispatch_cache_and_positions<T>(cos_sin_cache, query, positions, [&]<typename C, typename P>() {
      const P* pos = positions.data_ptr<P>();
      const C* cache = cos_sin_cache.data_ptr<C>();
      T* q = query.data_ptr<T>();
      T* k = key.data_ptr<T>();
      const T* v = value.data_ptr<T>();
      T* k_out = k_cache.data_ptr<T>();
      T* v_out = v_cache.data_ptr<T>();
      at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const bool store = slots[t] >= 0;
          kernels::cpu::qk_norm_rope_store_token<T, C>(
              {q + t * query.stride(0), query.stride(1), num_heads}, {k + t * key.stride(0), key.stride(1), num_kv_heads},
              {v + t * value.stride(0), value.stride(1), num_kv_heads}, q_weight.data_ptr<T>(), k_weight.data_ptr<T>(),
              eps, head_dim, cache + pos[t] * rot_dim, rot_dim / 2, store ? k_out + slots[t] * slot_size : nullptr,
              store ? v_out + slots[t] * slot_size : nullptr);
        }
      });
    });
  });
}

}  // namespace pnl::ops::PNL_CPU_ISA
