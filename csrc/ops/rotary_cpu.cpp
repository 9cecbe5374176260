// CPU adapter of rotary_embedding: checks, dtype dispatch, one token per loop step.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/checks.h"
#include "pnl/kernels/cpu/rotary.h"

namespace pnl::ops {
namespace {

/// Heads of a [T, heads * head_size] or [T, heads, head_size] tensor (rows may be strided).
struct Heads {
  int64_t count;
  int64_t stride;  // elements between heads
};

Heads heads_of(const at::Tensor& t, const char* name, int64_t num_tokens, int64_t head_size) {
  check_rows(t, name);
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, name, " must be [num_tokens, heads * head_size] or [num_tokens, heads, ",
              "head_size], got shape ", t.sizes());
  TORCH_CHECK(t.size(0) == num_tokens, name, " must have one row per position (", num_tokens, "), got shape ",
              t.sizes());
  if (t.dim() == 3) {
    TORCH_CHECK(t.size(2) == head_size, name, " must have head_size ", head_size, " in its last dim, got shape ",
                t.sizes());
    return {t.size(1), t.stride(1)};
  }
  TORCH_CHECK(t.size(1) % head_size == 0, name, " width ", t.size(1), " is not a multiple of head_size ", head_size);
  return {t.size(1) / head_size, head_size};
}

}  // namespace

// positions [T] int32/int64; query [T, H * D] or [T, H, D]; key [T, Hkv * D] or [T, Hkv, D] (rows
// may be strided); cos_sin_cache [max_position, rot_dim], float32 or query's dtype.
void rotary_embedding_cpu(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                          const at::Tensor& cos_sin_cache, int64_t head_size) {
  TORCH_CHECK(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong,
              "positions must be int32 or int64, got ", positions.scalar_type());
  TORCH_CHECK(positions.dim() == 1 && positions.is_contiguous(), "positions must be a contiguous [num_tokens], got ",
              "shape ", positions.sizes());
  TORCH_CHECK(head_size > 0, "head_size must be positive, got ", head_size);
  const int64_t num_tokens = positions.size(0);
  const Heads q_heads = heads_of(query, "query", num_tokens, head_size);
  const Heads k_heads = heads_of(key, "key", num_tokens, head_size);
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

  const bool is_int32 = positions.scalar_type() == at::kInt;
  const int32_t* pos32 = is_int32 ? positions.data_ptr<int32_t>() : nullptr;
  const int64_t* pos64 = is_int32 ? nullptr : positions.data_ptr<int64_t>();
  auto position = [&](int64_t t) -> int64_t { return is_int32 ? pos32[t] : pos64[t]; };
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(position(t) >= 0 && position(t) < max_position, "positions[", t, "] = ", position(t),
                " is out of range [0, ", max_position, ") of cos_sin_cache");
  }

  const int64_t half = rot_dim / 2;
  const int64_t token_work = std::max<int64_t>(1, (q_heads.count + k_heads.count) * rot_dim);
  const int64_t grain = std::max<int64_t>(1, kGrainSize / token_work);  // tokens per chunk
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "rotary_embedding_cpu", [&] {
    auto run = [&](const auto* cache) {
      scalar_t* q = query.data_ptr<scalar_t>();
      scalar_t* k = key.data_ptr<scalar_t>();
      at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const auto* cos_sin = cache + position(t) * rot_dim;
          kernels::cpu::rotary_embedding_token(q + t * query.stride(0), q_heads.stride, q_heads.count, cos_sin, half);
          kernels::cpu::rotary_embedding_token(k + t * key.stride(0), k_heads.stride, k_heads.count, cos_sin, half);
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

}  // namespace pnl::ops

TORCH_LIBRARY_IMPL(pnl, CPU, m) { m.impl("rotary_embedding", &pnl::ops::rotary_embedding_cpu); }
