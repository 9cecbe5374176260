// CPU adapter of linear: checks, dtype dispatch, the register-tile shape, and the work split.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "ops/cpu_ops.h"
#include "ops/linear.h"
#include "pnl/kernels/cpu/linear.h"

namespace pnl::ops::PNL_CPU_ISA {
namespace {

/// Rows of x per work item: bounds what one item sweeps per panel of W (256 x 576 fp32 rows are
/// 590 KB, within a Zen 4 core's L2), and gives a long prefill several items per panel.
constexpr int64_t kRowChunk = 256;

/// Work items are (row chunk, panel of RN blocks), split evenly over at::parallel_for's threads;
/// one thread's items are neighbouring panels of one chunk, so W streams in order. With
/// prefetch_next, each item's tiles bring the thread's next panel into L2 as they go.
template <typename T, int RM, int RN>
void run(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, const T* bias, const LinearShape& s,
         bool prefetch_next) {
  const int64_t panels = (s.num_blocks + RN - 1) / RN;
  const int64_t chunks = (s.rows + kRowChunk - 1) / kRowChunk;
  const int64_t item_work = std::min(s.rows, kRowChunk) * s.in_features * RN * kernels::cpu::kLinearBlock;
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(item_work, 1));
  T* y = out.data_ptr<T>();
  const T* x = input.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  at::parallel_for(0, chunks * panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r0 = item / panels * kRowChunk;
      const int64_t next = prefetch_next && item + 1 < end ? (item + 1) % panels : -1;
      kernels::cpu::linear_panel<T, RM, RN>(y + r0 * out.stride(0), out.stride(0), x + r0 * input.stride(0),
                                            input.stride(0), w, bias, s.in_features,
                                            std::min(kRowChunk, s.rows - r0), s.num_blocks, item % panels, next);
    }
  });
}

/// The register tiles (rows x blocks) of this instruction set: the sums, one block row of weights
/// and a broadcast must fit its registers (32 zmm; 16 ymm, 2 a block; 16 xmm, 4 a block). A few
/// rows (decoding) are bound by reading W: blocks side by side keep more loads in flight, and the
/// hardware prefetcher follows one row's stream (our prefetch only slowed it). More rows are bound
/// by the arithmetic: tall tiles reuse each load of W most.
template <typename T>
void run_tiles(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, const T* bias,
               const LinearShape& shape) {
#if defined(__AVX512F__)
  if (shape.rows <= 4) return run<T, 4, 4>(out, input, weight, bias, shape, false);
  return run<T, 8, 3>(out, input, weight, bias, shape, true);
#elif defined(__AVX2__)
  if (shape.rows == 1) return run<T, 1, 4>(out, input, weight, bias, shape, false);
  if (shape.rows <= 4) return run<T, 4, 1>(out, input, weight, bias, shape, true);
  return run<T, 6, 1>(out, input, weight, bias, shape, true);
#else
  if (shape.rows == 1) return run<T, 1, 2>(out, input, weight, bias, shape, false);
  return run<T, 2, 1>(out, input, weight, bias, shape, true);
#endif
}

}  // namespace

// out [M, N] = input [M, K] W^T + bias, W packed as weight [N / 16, K, 16]; bias [N] or None.
void linear_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias) {
  const LinearShape shape = check_linear(out, input, weight, bias);
  if (shape.rows == 0 || shape.num_blocks == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "linear_cpu", [&] {
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    run_tiles(out, input, weight, b, shape);
  });
}

}  // namespace pnl::ops::PNL_CPU_ISA
