// CPU adapter of sample_tokens: checks, dtype dispatch, and the work split: (row, vocabulary chunk)
// items, so a few rows still spread over every thread; each row's chunks merge in order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "ops/cpu_ops.h"
#include "ops/sample.h"
#include "pnl/kernels/cpu/sample.h"

namespace pnl::ops::PNL_CPU_ISA {
namespace {

/// Tokens per work item, at least: below it, waking another thread costs more than it saves.
constexpr int64_t kMinChunk = 8192;

}  // namespace

// tokens [B] = one token per row of logits [B, V] at temperature [B] (0: argmax), drawn with the
// noise of (seeds [B], steps [B]).
void sample_tokens_cpu(at::Tensor& tokens, const at::Tensor& logits, const at::Tensor& temperature,
                       const at::Tensor& seeds, const at::Tensor& steps) {
  const int64_t vocab = check_sample_tokens(tokens, logits, temperature, seeds, steps);
  const int64_t rows = logits.size(0);
  const float* temps = temperature.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(std::isfinite(temps[r]) && temps[r] >= 0, "temperature[", r, "] = ", temps[r],
                " must be finite and >= 0 (0 takes the argmax)");
  }
  if (rows == 0) return;
  const int64_t max_chunks = (vocab + kMinChunk - 1) / kMinChunk;
  const int64_t chunks = std::clamp<int64_t>((at::get_num_threads() + rows - 1) / rows, 1, max_chunks);
  const int64_t chunk = (vocab + chunks - 1) / chunks;
  const int64_t* seed = seeds.data_ptr<int64_t>();
  const int64_t* step = steps.data_ptr<int64_t>();
  int64_t* out = tokens.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sample_tokens_cpu", [&] {
    using Acc = kernels::cpu::acc_t<scalar_t>;
    std::vector<kernels::cpu::Candidate<Acc>> best(rows * chunks);
    const scalar_t* x = logits.data_ptr<scalar_t>();
    at::parallel_for(0, rows * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t r = item / chunks, c = item % chunks;
        const bool greedy = temps[r] == 0;
        const uint64_t key = kernels::sample_row_key(static_cast<uint64_t>(seed[r]), static_cast<uint64_t>(step[r]));
        best[item] = kernels::cpu::sample_range(x + r * logits.stride(0), c * chunk, std::min(vocab, c * chunk + chunk),
                                                greedy, greedy ? Acc(1) : Acc(1) / temps[r], key);
      }
    });
    for (int64_t r = 0; r < rows; ++r) {
      kernels::cpu::Candidate<Acc> winner;
      for (int64_t c = 0; c < chunks; ++c) winner.merge(best[r * chunks + c]);
      out[r] = winner.token < 0 ? 0 : winner.token;  // every logit -inf or NaN: token 0, as argmax
    }
  });
}

}  // namespace pnl::ops::PNL_CPU_ISA
