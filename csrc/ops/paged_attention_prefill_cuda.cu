// CUDA adapter of paged_attention_prefill: the shape checks of the CPU twin (not the index
// contents, which stay on the device: no host sync, so the op can be captured in a CUDA graph),
// then one launch.
#include <torch/library.h>

#include <limits>

#include "ops/cuda_dispatch.h"
#include "ops/paged_attention.h"
#include "pnl/kernels/cuda/paged_attention_prefill.cuh"

namespace pnl::ops {

// out, query [T, H, D] (rows may be strided); cu_seqlens_q [S + 1]; context_lens [S]; block_tables
// [S, max_blocks]. Sequence s's new tokens are its last q_len = cu_seqlens_q[s+1] - cu_seqlens_q[s].
void paged_attention_prefill_cuda(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& cu_seqlens_q,
                                  const at::Tensor& context_lens, const at::Tensor& block_tables, double scale) {
  const AttentionShape shape = check_prefill(out, query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables);
  const int64_t num_seqs = context_lens.size(0);
  TORCH_CHECK(shape.head_dim <= kernels::cuda::kPrefillMaxHeadDim, "paged_attention_prefill on CUDA supports ",
              "head_dim up to ", kernels::cuda::kPrefillMaxHeadDim, ", got ", shape.head_dim);
  constexpr int64_t kMaxInt = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(query.size(0) <= kMaxInt && shape.num_blocks * shape.block_size <= kMaxInt &&
                  shape.num_heads <= 65535,
              "paged_attention_prefill on CUDA: too many tokens, cache slots or heads (query ", query.sizes(),
              ", k_cache ", k_cache.sizes(), ")");
  const c10::cuda::CUDAGuard guard(query.device());
  dispatch_cuda_float(query.scalar_type(), "paged_attention_prefill", [&]<typename T>() {
    const kernels::cuda::PrefillArgs<T> args{
        .out = ptr<T>(out),
        .query = ptr<const T>(query),
        .k_cache = ptr<const T>(k_cache),
        .v_cache = ptr<const T>(v_cache),
        .cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>(),
        .context_lens = context_lens.data_ptr<int32_t>(),
        .block_tables = block_tables.data_ptr<int32_t>(),
        .q_token_stride = query.stride(0),
        .q_head_stride = query.stride(1),
        .out_token_stride = out.stride(0),
        .out_head_stride = out.stride(1),
        .num_tokens = static_cast<int32_t>(query.size(0)),
        .num_seqs = static_cast<int32_t>(num_seqs),
        .num_heads = static_cast<int32_t>(shape.num_heads),
        .num_kv_heads = static_cast<int32_t>(shape.num_kv_heads),
        .head_dim = static_cast<int32_t>(shape.head_dim),
        .num_blocks = static_cast<int32_t>(shape.num_blocks),
        .block_size = static_cast<int32_t>(shape.block_size),
        .max_blocks = static_cast<int32_t>(shape.max_blocks),
        .scale = scale,
    };
    check_launch(kernels::cuda::paged_attention_prefill(args, current_stream()), "paged_attention_prefill");
  });
}

}  // namespace pnl::ops

TORCH_LIBRARY_IMPL(pnl, CUDA, m) { m.impl("paged_attention_prefill", &pnl::ops::paged_attention_prefill_cuda); }
