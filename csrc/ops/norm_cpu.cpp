// CPU adapters of rms_norm and fused_add_rms_norm: checks, dtype dispatch, one row per loop step.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "ops/cpu_ops.h"
#include "ops/norm.h"
#include "pnl/kernels/cpu/norm.h"

namespace pnl::ops::PNL_CPU_ISA {
namespace {

/// Rows per at::parallel_for chunk: about torch's grain of elementwise work.
int64_t rows_per_chunk(int64_t hidden) {
  return std::max<int64_t>(1, kGrainSize / std::max<int64_t>(hidden, 1));
}

}  // namespace

void rms_norm_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps) {
  const int64_t hidden = check_rms_norm(out, input, weight);
  const Rows in_rows = rows_of(input, "input");
  const Rows out_rows = rows_of(out, "out");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "rms_norm_cpu", [&] {
    const scalar_t* x = input.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, in_rows.count, rows_per_chunk(hidden), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        kernels::cpu::rms_norm_row(y + out_rows.offset(r), x + in_rows.offset(r), w, hidden, eps);
      }
    });
  });
}

void fused_add_rms_norm_cpu(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps) {
  const int64_t hidden = check_fused_add_rms_norm(input, residual, weight);
  const Rows in_rows = rows_of(input, "input");
  const Rows res_rows = rows_of(residual, "residual");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fused_add_rms_norm_cpu", [&] {
    scalar_t* x = input.data_ptr<scalar_t>();
    scalar_t* res = residual.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    at::parallel_for(0, in_rows.count, rows_per_chunk(hidden), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        kernels::cpu::fused_add_rms_norm_row(x + in_rows.offset(r), res + res_rows.offset(r), w, hidden, eps);
      }
    });
  });
}

}  // namespace pnl::ops::PNL_CPU_ISA
