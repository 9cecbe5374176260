// CPU adapter of rotary_embedding: checks, dtype dispatch, one token per loop step.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "ops/cpu_ops.h"
#include "ops/rotary.h"
#include "pnl/kernels/cpu/rotary.h"

namespace pnl::ops::PNL_CPU_ISA {

void rotary_embedding_cpu(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                          const at::Tensor& cos_sin_cache, int64_t head_size) {
  const RotaryShape shape = check_rotary_embedding(positions, query, key, cos_sin_cache, head_size);
  check_positions_in_range(positions, shape.max_position);
  const int64_t num_tokens = shape.num_tokens, rot_dim = shape.rot_dim, half = rot_dim / 2;
  const Rows q_heads = shape.q_heads, k_heads = shape.k_heads;
  const int64_t token_work = std::max<int64_t>(1, (q_heads.inner + k_heads.inner) * rot_dim);
  const int64_t grain = std::max<int64_t>(1, kGrainSize / token_work);  // tokens per chunk
  const bool is_int32 = positions.scalar_type() == at::kInt;
  const int32_t* pos32 = is_int32 ? positions.data_ptr<int32_t>() : nullptr;
  const int64_t* pos64 = is_int32 ? nullptr : positions.data_ptr<int64_t>();
  auto position = [&](int64_t t) -> int64_t { return is_int32 ? pos32[t] : pos64[t]; };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "rotary_embedding_cpu", [&] {
    auto run = [&](const auto* cache) {
      scalar_t* q = query.data_ptr<scalar_t>();
      scalar_t* k = key.data_ptr<scalar_t>();
      at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const auto* cos_sin = cache + position(t) * rot_dim;
          kernels::cpu::rotary_embedding_token(q + t * q_heads.outer_stride, q_heads.inner_stride, q_heads.inner,
                                               cos_sin, half);
          kernels::cpu::rotary_embedding_token(k + t * k_heads.outer_stride, k_heads.inner_stride, k_heads.inner,
                                               cos_sin, half);
        }
      });
    };
    if (cos_sin_cache.scalar_type() == query.scalar_type()) {
      run(cos_sin_cache.data_ptr<scalar_t>());
    } else {
      run(cos_sin_cache.data_ptr<float>());
    }
  });
}

}  // namespace pnl::ops::PNL_CPU_ISA
