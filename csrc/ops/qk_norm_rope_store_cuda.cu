// CUDA adapter of qk_norm_rope_store: the same checks as the CPU twin except the position and slot
// ranges (which would read index tensors on the host), then one launch.
#include <torch/library.h>

#include "ops/cuda_dispatch.h"
#include "ops/qk_norm_rope_store.h"
#include "pnl/kernels/cuda/qk_norm_rope_store.cuh"

namespace pnl::ops {

void qk_norm_rope_store_cuda(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                             const at::Tensor& value, const at::Tensor& q_weight, const at::Tensor& k_weight,
                             double eps, const at::Tensor& cos_sin_cache, at::Tensor& k_cache, at::Tensor& v_cache,
                             const at::Tensor& slot_mapping) {
  const RotaryShape shape = check_qk_norm_rope_store(positions, query, key, value, q_weight, k_weight, cos_sin_cache,
                                                     k_cache, v_cache, slot_mapping);
  const int64_t head_dim = query.size(2);
  const kernels::cuda::QkNormRopeStoreArgs args{shape.q_heads,
                                                shape.k_heads,
                                                heads_of(value, "value", shape.num_tokens, head_dim),
                                                shape.num_tokens,
                                                static_cast<int>(head_dim),
                                                static_cast<int>(shape.rot_dim / 2),
                                                shape.max_position,
                                                k_cache.size(0) * k_cache.size(1),
                                                eps,
                                                /*group=*/0};
  const c10::cuda::CUDAGuard guard(query.device());
  dispatch_cuda_float(query.scalar_type(), "qk_norm_rope_store", [&]<typename T>() {
    dispatch_cache_and_positions<T>(cos_sin_cache, query, positions, [&]<typename C, typename P>() {
      check_launch(kernels::cuda::qk_norm_rope_store(ptr<const P>(positions), ptr<T>(query), ptr<T>(key),
                                                     ptr<const T>(value), ptr<const T>(q_weight),
                                                     ptr<const T>(k_weight), ptr<const C>(cos_sin_cache),
                                                     ptr<T>(k_cache), ptr<T>(v_cache),
                                                     ptr<const int32_t>(slot_mapping), args, current_stream()),
                   "qk_norm_rope_store");
    });
  });
}

}  // namespace pnl::ops

TORCH_LIBRARY_IMPL(pnl, CUDA, m) { m.impl("qk_norm_rope_store", &pnl::ops::qk_norm_rope_store_cuda); }
