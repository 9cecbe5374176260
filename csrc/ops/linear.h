// Argument checks of linear, shared by its CPU and CUDA adapters.
#pragma once

#include <optional>

#include "ops/checks.h"

namespace pnl::ops {

struct LinearShape {
  int64_t rows, in_features, num_blocks;  // M, K, N / 16
};

/// out [M, N] and input [M, K] (rows may be strided), weight [N / 16, K, 16] (packed), bias [N].
inline LinearShape check_linear(const at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  check_rows(input, "input");
  check_rows(out, "out");
  check_same(out, "out", input, "input");
  check_same(weight, "weight", input, "input");
  TORCH_CHECK(input.dim() == 2 && out.dim() == 2, "linear needs input [M, K] and out [M, N], got input ",
              input.sizes(), " and out ", out.sizes());
  TORCH_CHECK(weight.dim() == 3 && weight.size(2) == 16 && weight.is_contiguous(),
              "linear needs a contiguous packed weight [N / 16, K, 16] (ops.pack_linear_weight), got shape ",
              weight.sizes(), " and strides ", weight.strides());
  const int64_t rows = input.size(0), in_features = input.size(1), num_blocks = weight.size(0);
  TORCH_CHECK(in_features > 0, "linear needs in_features K > 0, got input ", input.sizes());
  TORCH_CHECK(weight.size(1) == in_features && out.size(0) == rows && out.size(1) == num_blocks * 16,
              "linear: input ", input.sizes(), ", packed weight ", weight.sizes(), " and out ", out.sizes(),
              " do not fit [M, K] x [N / 16, K, 16] -> [M, N]");
  if (bias.has_value()) {
    check_same(*bias, "bias", input, "input");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == num_blocks * 16 && bias->is_contiguous(),
                "bias must be a contiguous [", num_blocks * 16, "], got shape ", bias->sizes());
  }
  return {rows, in_features, num_blocks};
}

}  // namespace pnl::ops
