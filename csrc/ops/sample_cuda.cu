// CUDA adapter of sample_tokens: the same checks as the CPU twin (but for the temperatures' values,
// which stay on the device), then one launch.
#include <torch/library.h>

#include "ops/cuda_dispatch.h"
#include "ops/sample.h"
#include "pnl/kernels/cuda/sample.cuh"

namespace pnl::ops {

void sample_tokens_cuda(at::Tensor& tokens, const at::Tensor& logits, const at::Tensor& temperature,
                        const at::Tensor& seeds, const at::Tensor& steps) {
  const int64_t vocab = check_sample_tokens(tokens, logits, temperature, seeds, steps);
  const c10::cuda::CUDAGuard guard(logits.device());
  const kernels::cuda::SampleParams params{temperature.data_ptr<float>(), seeds.data_ptr<int64_t>(),
                                           steps.data_ptr<int64_t>()};
  dispatch_cuda_float(logits.scalar_type(), "sample_tokens", [&]<typename T>() {
    check_launch(kernels::cuda::sample_tokens(tokens.data_ptr<int64_t>(), ptr<const T>(logits), logits.size(0),
                                              logits.stride(0), static_cast<int>(vocab), params, current_stream()),
                 "sample_tokens");
  });
}

}  // namespace pnl::ops

TORCH_LIBRARY_IMPL(pnl, CUDA, m) { m.impl("sample_tokens", &pnl::ops::sample_tokens_cuda); }
