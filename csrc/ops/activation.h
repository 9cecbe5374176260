// Argument checks of silu_and_mul, shared by its CPU and CUDA adapters.
#pragma once

#include "ops/checks.h"

namespace pnl::ops {

/// input [..., 2 * d], out [..., d] (1 to 3 dims; rows may be strided). Returns d.
inline int64_t check_silu_and_mul(const at::Tensor& out, const at::Tensor& input) {
  rows_of(input, "input");
  rows_of(out, "out");
  check_same(out, "out", input, "input");
  const bool same_rows =
      input.dim() == out.dim() && input.sizes().slice(0, input.dim() - 1) == out.sizes().slice(0, out.dim() - 1);
  TORCH_CHECK(same_rows && input.size(-1) == 2 * out.size(-1),
              "silu_and_mul needs input [..., 2 * d] and out [..., d], got input ", input.sizes(), " and out ",
              out.sizes());
  return out.size(-1);
}

}  // namespace pnl::ops
