// CUDA adapter of paged_attention_decode: the CPU twin's shape checks (never the index contents,
// which stay on the device: no sync, so the op can be captured in a CUDA graph), the plan, the
// partials' scratch from torch's caching allocator, and the launch.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>

#include "ops/cuda_dispatch.h"
#include "ops/paged_attention.h"
#include "pnl/kernels/cuda/paged_attention_decode.cuh"

namespace pnl::ops {

// out, query [S, H, D] (rows may be strided): one new token per sequence, the last of its
// context_lens[s] >= 1 tokens; caches [num_blocks, block_size, Hkv, D]; context_lens [S];
// block_tables [S, max_blocks].
void paged_attention_decode_cuda(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& context_lens,
                                 const at::Tensor& block_tables, double scale) {
  namespace cuda = kernels::cuda;
  const AttentionShape shape = check_decode(out, query, k_cache, v_cache, context_lens, block_tables);
  const int64_t num_seqs = context_lens.size(0);
  TORCH_CHECK(shape.head_dim <= cuda::kDecodeMaxHeadDim, "paged_attention_decode on CUDA supports head_dim up to ",
              cuda::kDecodeMaxHeadDim, ", got ", shape.head_dim);
  if (num_seqs == 0 || shape.num_heads == 0 || shape.head_dim == 0) return;
  const c10::cuda::CUDAGuard guard(query.device());
  dispatch_cuda_float(query.scalar_type(), "paged_attention_decode", [&]<typename T>() {
    using A = cuda::acc_t<T>;
    const cuda::DecodePlan plan =
        cuda::plan_paged_attention_decode(ptr<const T>(k_cache), ptr<const T>(v_cache), num_seqs, shape.num_heads,
                                          shape.num_kv_heads, shape.head_dim, shape.block_size, shape.max_blocks);
    TORCH_CHECK(plan.num_ctas <= std::numeric_limits<int32_t>::max(), "paged_attention_decode: ", plan.num_ctas,
                " CTAs exceed the grid limit; use fewer sequences or a narrower block table");
    at::Tensor partials;  // [partial_rows] maxima, [partial_rows] sums, [partial_elems] outputs
    if (plan.merge) {
      const auto acc_type = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
      partials = at::empty({2 * plan.partial_rows + plan.partial_elems}, query.options().dtype(acc_type));
    }
    A* part = plan.merge ? ptr<A>(partials) : nullptr;
    const cuda::DecodeArgs<T> args{
        ptr<T>(out),
        ptr<const T>(query),
        ptr<const T>(k_cache),
        ptr<const T>(v_cache),
        context_lens.data_ptr<int32_t>(),
        block_tables.data_ptr<int32_t>(),
        part,
        part ? part + plan.partial_rows : nullptr,
        part ? part + 2 * plan.partial_rows : nullptr,
        rows_of(out, "out"),
        rows_of(query, "query"),
        shape.num_heads,
        shape.num_kv_heads,
        shape.head_dim,
        shape.num_blocks,
        shape.block_size,
        shape.max_blocks,
        static_cast<A>(scale * 1.4426950408889634),  // log2(e)
    };
    check_launch(cuda::paged_attention_decode(args, plan, current_stream()), "paged_attention_decode");
  });
}

}  // namespace pnl::ops

TORCH_LIBRARY_IMPL(pnl, CUDA, m) { m.impl("paged_attention_decode", &pnl::ops::paged_attention_decode_cuda); }
