// Argument checks of sample_tokens, shared by its CPU and CUDA adapters.
#pragma once

#include "ops/checks.h"

namespace pnl::ops {

/// tokens [B] int64 (out); logits [B, V] float (rows may be strided); temperature [B] float32;
/// seeds, steps [B] int64; all on one device. Returns V.
inline int64_t check_sample_tokens(const at::Tensor& tokens, const at::Tensor& logits, const at::Tensor& temperature,
                                   const at::Tensor& seeds, const at::Tensor& steps) {
  check_rows(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "sample_tokens needs logits [B, V], got shape ", logits.sizes());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0 && vocab <= std::numeric_limits<int32_t>::max(),
              "sample_tokens needs a vocabulary of 1 to 2^31 - 1 tokens, got ", vocab);
  const auto check_row_param = [&](const at::Tensor& t, const char* name, at::ScalarType dtype) {
    check_device(t, name, logits, "logits");
    TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 1 && t.size(0) == rows && t.is_contiguous(), name, " must be a contiguous [", rows,
                "] (one per row of logits), got shape ", t.sizes());
  };
  check_row_param(tokens, "tokens", at::kLong);
  check_row_param(temperature, "temperature", at::kFloat);
  check_row_param(seeds, "seeds", at::kLong);
  check_row_param(steps, "steps", at::kLong);
  return vocab;
}

}  // namespace pnl::ops
