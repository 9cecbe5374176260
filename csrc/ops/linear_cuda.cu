// CUDA adapter of linear. On a GPU the engine keeps plain [N, K] weights and F.linear calls cuBLAS;
// this twin serves a weight packed for the CPU as one cuBLAS batched matmul over its blocks.
#include <ATen/ops/bmm.h>
#include <torch/library.h>

#include "ops/cuda_dispatch.h"
#include "ops/linear.h"

namespace pnl::ops {

void linear_cuda(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias) {
  const LinearShape s = check_linear(out, input, weight, bias);
  const c10::cuda::CUDAGuard guard(input.device());
  // [N / 16, M, K] x [N / 16, K, 16] -> [N / 16, M, 16] -> [M, N]
  const at::Tensor blocks = at::bmm(input.unsqueeze(0).expand({s.num_blocks, s.rows, s.in_features}), weight);
  out.copy_(blocks.permute({1, 0, 2}).reshape({s.rows, s.num_blocks * 16}));
  if (bias.has_value()) out.add_(*bias);
}

}  // namespace pnl::ops

TORCH_LIBRARY_IMPL(pnl, CUDA, m) { m.impl("linear", &pnl::ops::linear_cuda); }
