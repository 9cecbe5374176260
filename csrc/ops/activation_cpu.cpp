// CPU adapter of silu_and_mul: checks, dtype dispatch, one row per loop step.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "ops/cpu_ops.h"
#include "ops/activation.h"
#include "pnl/kernels/cpu/activation.h"

namespace pnl::ops::PNL_CPU_ISA {

void silu_and_mul_cpu(at::Tensor& out, const at::Tensor& input) {
  const int64_t d = check_silu_and_mul(out, input);
  const Rows in_rows = rows_of(input, "input");
  const Rows out_rows = rows_of(out, "out");
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

}  // namespace pnl::ops::PNL_CPU_ISA
