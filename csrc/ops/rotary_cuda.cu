// CUDA adapter of rotary_embedding: the same checks as the CPU twin except the position range (which
// would read positions on the host), then one launch.
#include <torch/library.h>

#include "ops/cuda_dispatch.h"
#include "ops/rotary.h"
#include "pnl/kernels/cuda/rotary.cuh"

namespace pnl::ops {

void rotary_embedding_cuda(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                           const at::Tensor& cos_sin_cache, int64_t head_size) {
  const RotaryShape shape = check_rotary_embedding(positions, query, key, cos_sin_cache, head_size);
  const c10::cuda::CUDAGuard guard(query.device());
  dispatch_cuda_float(query.scalar_type(), "rotary_embedding", [&]<typename T>() {
    dispatch_cache_and_positions<T>(cos_sin_cache, query, positions, [&]<typename C, typename P>() {
      check_launch(kernels::cuda::rotary_embedding(ptr<const P>(positions), ptr<T>(query), ptr<T>(key),
                                                   ptr<const C>(cos_sin_cache), shape.q_heads, shape.k_heads,
                                                   shape.num_tokens, shape.rot_dim, shape.max_position,
                                                   current_stream()),
                   "rotary_embedding");
    });
  });
}

}  // namespace pnl::ops

TORCH_LIBRARY_IMPL(pnl, CUDA, m) { m.impl("rotary_embedding", &pnl::ops::rotary_embedding_cuda); }
