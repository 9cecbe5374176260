// Argument checks of rotary_embedding, shared by its CPU and CUDA adapters (and by
// qk_norm_rope_store, which rotates the same way).
#pragma once

#include "ops/checks.h"

namespace pnl::ops {

/// The heads of a [T, heads * head_size] or [T, heads, head_size] tensor (rows may be strided) as
/// Rows: count = T * heads, inner = heads, outer_stride = token stride, inner_stride = head stride.
inline Rows heads_of(const at::Tensor& t, const char* name, int64_t num_tokens, int64_t head_size) {
  check_rows(t, name);
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, name, " must be [num_tokens, heads * head_size] or [num_tokens, heads, ",
              "head_size], got shape ", t.sizes());
  TORCH_CHECK(t.size(0) == num_tokens, name, " must have one row per position (", num_tokens, "), got shape ",
              t.sizes());
  Rows heads;
  heads.outer_stride = t.stride(0);
  if (t.dim() == 3) {
    TORCH_CHECK(t.size(2) == head_size, name, " must have head_size ", head_size, " in its last dim, got shape ",
                t.sizes());
    heads.inner = t.size(1);
    heads.inner_stride = t.stride(1);
  } else {
    TORCH_CHECK(t.size(1) % head_size == 0, name, " width ", t.size(1), " is not a multiple of head_size ",
                head_size);
    heads.inner = t.size(1) / head_size;
    heads.inner_stride = head_size;
  }
  heads.count = num_tokens * heads.inner;
  return heads;
}

struct RotaryShape {
  int64_t num_tokens;
  Rows q_heads, k_heads;
  int64_t rot_dim, max_position;
};

/// positions [T] int32/int64; query [T, H * D] or [T, H, D]; key [T, Hkv * D] or [T, Hkv, D] (rows
/// may be strided); cos_sin_cache [max_position, rot_dim], float32 or query's dtype, rot_dim even
/// and at most head_size. Does not read positions (see check_positions_in_range).
inline RotaryShape check_rotary_embedding(const at::Tensor& positions, const at::Tensor& query,
                                          const at::Tensor& key, const at::Tensor& cos_sin_cache,
                                          int64_t head_size) {
  TORCH_CHECK(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong,
              "positions must be int32 or int64, got ", positions.scalar_type());
  TORCH_CHECK(positions.dim() == 1 && positions.is_contiguous(), "positions must be a contiguous [num_tokens], got ",
              "shape ", positions.sizes());
  TORCH_CHECK(head_size > 0, "head_size must be positive, got ", head_size);
  const int64_t num_tokens = positions.size(0);
  const Rows q_heads = heads_of(query, "query", num_tokens, head_size);
  const Rows k_heads = heads_of(key, "key", num_tokens, head_size);
  check_same(key, "key", query, "query");
  check_device(positions, "positions", query, "query");
  check_device(cos_sin_cache, "cos_sin_cache", query, "query");
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat || cos_sin_cache.scalar_type() == query.scalar_type(),
              "cos_sin_cache must be float32 or query's dtype ", query.scalar_type(), ", got ",
              cos_sin_cache.scalar_type());
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.is_contiguous(),
              "cos_sin_cache must be a contiguous [max_position, rot_dim], got shape ", cos_sin_cache.sizes());
  const int64_t max_position = cos_sin_cache.size(0), rot_dim = cos_sin_cache.size(1);
  TORCH_CHECK(rot_dim % 2 == 0 && rot_dim > 0 && rot_dim <= head_size, "cos_sin_cache rot_dim ", rot_dim,
              " must be even and in (0, head_size = ", head_size, "]");
  return {num_tokens, q_heads, k_heads, rot_dim, max_position};
}

/// CPU only (reads positions on the host; the CUDA kernels skip the rotation of a position out of
/// range instead, so they never sync): every position indexes a row of cos_sin_cache.
inline void check_positions_in_range(const at::Tensor& positions, int64_t max_position) {
  auto check = [&](const auto* pos) {
    for (int64_t t = 0; t < positions.size(0); ++t) {
      TORCH_CHECK(pos[t] >= 0 && pos[t] < max_position, "positions[", t, "] = ", pos[t], " is out of range [0, ",
                  max_position, ") of cos_sin_cache");
    }
  };
  if (positions.scalar_type() == at::kInt) {
    check(positions.data_ptr<int32_t>());
  } else {
    check(positions.data_ptr<int64_t>());
  }
}

/// Runs fn.template operator()<C, P>() with C the cos_sin_cache element type (T when its dtype is
/// query's, else float) and P the positions type (int32_t or int64_t). T is the caller's element type
/// of query's dtype, so the CUDA adapters can pass __nv_bfloat16 where the CPU ones pass c10::BFloat16.
template <typename T, typename Fn>
void dispatch_cache_and_positions(const at::Tensor& cos_sin_cache, const at::Tensor& query,
                                  const at::Tensor& positions, Fn&& fn) {
  const bool same = cos_sin_cache.scalar_type() == query.scalar_type();
  const bool int32 = positions.scalar_type() == at::kInt;
  if (same && int32) return fn.template operator()<T, int32_t>();
  if (same) return fn.template operator()<T, int64_t>();
  if (int32) return fn.template operator()<float, int32_t>();
  return fn.template operator()<float, int64_t>();
}

}  // namespace pnl::ops
