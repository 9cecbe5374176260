// Argument checks of rms_norm and fused_add_rms_norm, shared by their CPU and CUDA adapters.
#pragma once

#include "ops/checks.h"

namespace pnl::ops {

/// weight [hidden], contiguous, on input's device and of its dtype.
inline void check_norm_weight(const at::Tensor& weight, const char* name, const at::Tensor& input,
                              const char* input_name) {
  check_same(weight, name, input, input_name);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == input.size(-1), name, " must be [hidden] = [", input.size(-1),
              "], got shape ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), name, " must be contiguous");
}

/// input, out [..., hidden] (1 to 3 dims, rows may be strided; out may be input); weight [hidden].
/// Returns hidden.
inline int64_t check_rms_norm(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight) {
  rows_of(input, "input");
  rows_of(out, "out");
  check_same(out, "out", input, "input");
  TORCH_CHECK(out.sizes() == input.sizes(), "out must have input's shape ", input.sizes(), ", got ", out.sizes());
  check_norm_weight(weight, "weight", input, "input");
  return input.size(-1);
}

/// input, residual [..., hidden] (1 to 3 dims, rows may be strided), distinct; weight [hidden].
/// Returns hidden.
inline int64_t check_fused_add_rms_norm(const at::Tensor& input, const at::Tensor& residual,
                                        const at::Tensor& weight) {
  rows_of(input, "input");
  rows_of(residual, "residual");
  check_same(residual, "residual", input, "input");
  TORCH_CHECK(residual.sizes() == input.sizes(), "residual must have input's shape ", input.sizes(), ", got ",
              residual.sizes());
  TORCH_CHECK(input.numel() == 0 || input.data_ptr() != residual.data_ptr(), "input and residual must not alias");
  check_norm_weight(weight, "weight", input, "input");
  return input.size(-1);
}

}  // namespace pnl::ops
