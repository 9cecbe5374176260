// Argument checks of the paged attention ops, shared by their CPU and CUDA adapters. Shapes: T =
// tokens, S = sequences, H = query heads, Hkv = KV heads, D = head_dim.
#pragma once

#include "ops/checks.h"

namespace pnl::ops {

struct AttentionShape {
  int64_t num_heads, head_dim, num_kv_heads, num_blocks, block_size, max_blocks;
};

/// Checks the shapes, dtypes and devices both attention ops share, on any device. out, query
/// [N, H, D]; caches [num_blocks, block_size, Hkv, D]; context_lens [S]; block_tables [S, max_blocks].
inline AttentionShape check_attention(const at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                                      const at::Tensor& v_cache, const at::Tensor& context_lens,
                                      const at::Tensor& block_tables) {
  check_rows(query, "query");
  check_rows(out, "out");
  TORCH_CHECK(query.dim() == 3, "query must be [num_tokens, num_heads, head_dim], got shape ", query.sizes());
  TORCH_CHECK(out.sizes() == query.sizes(), "out must have query's shape ", query.sizes(), ", got ", out.sizes());
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got shape ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have k_cache's shape ", k_cache.sizes(), ", got ",
              v_cache.sizes());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "k_cache and v_cache must be contiguous");
  check_same(out, "out", query, "query");
  check_same(k_cache, "k_cache", query, "query");
  check_same(v_cache, "v_cache", query, "query");
  const AttentionShape shape{query.size(1),   query.size(2),   k_cache.size(2),
                             k_cache.size(0), k_cache.size(1), block_tables.dim() == 2 ? block_tables.size(1) : 0};
  TORCH_CHECK(k_cache.size(3) == shape.head_dim, "k_cache head_dim ", k_cache.size(3), " differs from query's ",
              shape.head_dim);
  TORCH_CHECK(shape.num_kv_heads > 0 && shape.num_heads % shape.num_kv_heads == 0, "num_heads ", shape.num_heads,
              " must be a multiple of num_kv_heads ", shape.num_kv_heads);
  TORCH_CHECK(shape.num_heads > 0 && shape.head_dim > 0 && shape.block_size > 0,
              "num_heads, head_dim and block_size must be > 0, got ", shape.num_heads, ", ", shape.head_dim, " and ",
              shape.block_size);
  check_index(context_lens, "context_lens", 1);
  check_index(block_tables, "block_tables", 2);
  check_device(context_lens, "context_lens", query, "query");
  check_device(block_tables, "block_tables", query, "query");
  TORCH_CHECK(block_tables.size(0) == context_lens.size(0), "block_tables must have one row per sequence (",
              context_lens.size(0), "), got shape ", block_tables.sizes());
  return shape;
}

/// check_attention plus cu_seqlens_q [S + 1] (its shape; its contents only the CPU twin reads).
inline AttentionShape check_prefill(const at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                                    const at::Tensor& v_cache, const at::Tensor& cu_seqlens_q,
                                    const at::Tensor& context_lens, const at::Tensor& block_tables) {
  const AttentionShape shape = check_attention(out, query, k_cache, v_cache, context_lens, block_tables);
  check_index(cu_seqlens_q, "cu_seqlens_q", 1);
  check_device(cu_seqlens_q, "cu_seqlens_q", query, "query");
  const int64_t num_seqs = context_lens.size(0);
  TORCH_CHECK(cu_seqlens_q.size(0) == num_seqs + 1, "cu_seqlens_q must be [num_seqs + 1] = [", num_seqs + 1,
              "], got shape ", cu_seqlens_q.sizes());
  return shape;
}

/// check_attention plus one query token per sequence.
inline AttentionShape check_decode(const at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                                   const at::Tensor& v_cache, const at::Tensor& context_lens,
                                   const at::Tensor& block_tables) {
  const AttentionShape shape = check_attention(out, query, k_cache, v_cache, context_lens, block_tables);
  TORCH_CHECK(query.size(0) == context_lens.size(0), "query must have one token per sequence (",
              context_lens.size(0), "), got shape ", query.sizes());
  return shape;
}

}  // namespace pnl::ops
