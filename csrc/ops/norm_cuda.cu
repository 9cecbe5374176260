// CUDA adapters of rms_norm and fused_add_rms_norm: the same checks as the CPU twins, then one launch.
#include <torch/library.h>

#include "ops/cuda_dispatch.h"
#include "ops/norm.h"
#include "pnl/kernels/cuda/norm.cuh"

namespace pnl::ops {

void rms_norm_cuda(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps) {
  const int64_t hidden = check_rms_norm(out, input, weight);
  const c10::cuda::CUDAGuard guard(input.device());
  dispatch_cuda_float(input.scalar_type(), "rms_norm", [&]<typename T>() {
    check_launch(kernels::cuda::rms_norm(ptr<T>(out), ptr<const T>(input), ptr<const T>(weight), rows_of(out, "out"),
                                         rows_of(input, "input"), hidden, eps, current_stream()),
                 "rms_norm");
  });
}

void fused_add_rms_norm_cuda(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps) {
  const int64_t hidden = check_fused_add_rms_norm(input, residual, weight);
  const c10::cuda::CUDAGuard guard(input.device());
  dispatch_cuda_float(input.scalar_type(), "fused_add_rms_norm", [&]<typename T>() {
    check_launch(kernels::cuda::fused_add_rms_norm(ptr<T>(input), ptr<T>(residual), ptr<const T>(weight),
                                                   rows_of(input, "input"), rows_of(residual, "residual"), hidden,
                                                   eps, current_stream()),
                 "fused_add_rms_norm");
  });
}

}  // namespace pnl::ops

TORCH_LIBRARY_IMPL(pnl, CUDA, m) {
  m.impl("rms_norm", &pnl::ops::rms_norm_cuda);
  m.impl("fused_add_rms_norm", &pnl::ops::fused_add_rms_norm_cuda);
}
