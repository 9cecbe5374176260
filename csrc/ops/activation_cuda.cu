// CUDA adapter of silu_and_mul: the same checks as the CPU twin, then one launch.
#include <torch/library.h>

#include "ops/activation.h"
#include "ops/cuda_dispatch.h"
#include "pnl/kernels/cuda/activation.cuh"

namespace pnl::ops {

void silu_and_mul_cuda(at::Tensor& out, const at::Tensor& input) {
  const int64_t d = check_silu_and_mul(out, input);
  const c10::cuda::CUDAGuard guard(input.device());
  dispatch_cuda_float(input.scalar_type(), "silu_and_mul", [&]<typename T>() {
    check_launch(kernels::cuda::silu_and_mul(ptr<T>(out), ptr<const T>(input), rows_of(out, "out"),
                                             rows_of(input, "input"), d, current_stream()),
                 "silu_and_mul");
  });
}

}  // namespace pnl::ops

TORCH_LIBRARY_IMPL(pnl, CUDA, m) { m.impl("silu_and_mul", &pnl::ops::silu_and_mul_cuda); }
