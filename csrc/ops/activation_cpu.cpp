// CPU adapter of silu_and_mul: checks, dtype dispatch, one row per loop step.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/checks.h"
#include "pnl/kernels/cpu/activation.h"

namespace pnl::ops {

// input [..., 2 * d], out [..., d] (1 to 3 dims; rows may be strided).
void silu_and_mul_cpu(at::Tensor& out, const at::Tensor& input) {
  const Rows in_rows = rows_of(input, "input");
  const Rows out_rows = rows_of(out, "out");
  check_same(out, "out", input, "input");
  const bool same_rows =
      input.dim() == out.dim() && input.sizes().slice(0, input.dim() - 1) == out.sizes().slice(0, out.dim() - 1);
  TORCH_CHECK(same_rows && input.size(-1) == 2 * out.size(-1),
              "silu_and_mul needs input [..., 2 * d] and out [..., d], got input ", input.sizes(), " and out ",
              out.sizes());
  const int64_t d = out.size(-1);
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(d, 1));  // rows per chunk
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "silu_and_mul_cpu", [&] {
    const scalar_t* x = input.data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, in_rows.count, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        kernels::cpu::silu_and_mul_row(y + out_rows.offset(r), x + in_rows.offset(r), d);
      }
    });
  });
}

}  // namespace pnl::ops

TORCH_LIBRARY_IMPL(pnl, CPU, m) { m.impl("silu_and_mul", &pnl::ops::silu_and_mul_cpu); }
