// CUDA adapter of store_kv_cache: the same checks as the CPU twin except the slot range (which would
// read slot_mapping on the host), then one launch.
#include <torch/library.h>

#include "ops/cuda_dispatch.h"
#include "ops/kv_cache.h"
#include "ops/rotary.h"
#include "pnl/kernels/cuda/kv_cache.cuh"

namespace pnl::ops {

void store_kv_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                         const at::Tensor& slot_mapping) {
  check_store_kv_cache(key, value, k_cache, v_cache, slot_mapping);
  const int64_t num_tokens = key.size(0), head_dim = key.size(2);
  const c10::cuda::CUDAGuard guard(key.device());
  dispatch_cuda_float(key.scalar_type(), "store_kv_cache", [&]<typename T>() {
    check_launch(kernels::cuda::store_kv_cache(ptr<const T>(key), ptr<const T>(value), ptr<T>(k_cache),
                                               ptr<T>(v_cache), ptr<const int32_t>(slot_mapping),
                                               heads_of(key, "key", num_tokens, head_dim),
                                               heads_of(value, "value", num_tokens, head_dim), num_tokens, head_dim,
                                               k_cache.size(0) * k_cache.size(1), current_stream()),
                 "store_kv_cache");
  });
}

}  // namespace pnl::ops

TORCH_LIBRARY_IMPL(pnl, CUDA, m) { m.impl("store_kv_cache", &pnl::ops::store_kv_cache_cuda); }
