// sample_tokens on the GPU: one block per row, each thread a strided share of the vocabulary,
// 16-byte loads where the rows are aligned. Torch-free.
//
// Each thread keeps its best score logit / T + Gumbel noise (sample_noise.h) and skips the noise
// of a token whose score could not beat that best even with the largest noise there is
// (kMaxGumbel): past the first few hundred tokens almost every token is skipped, so the pass is
// bound by reading the logits, not by the hash and the two logs. Then the block takes the best
// score, on a tie the lowest token.
#pragma once

#include <cstdint>

#include "pnl/kernels/cuda/common.cuh"
#include "pnl/kernels/sample_noise.h"

namespace pnl::kernels::cuda {

struct SampleParams {
  const float* temperature;  // [B], 0: argmax
  const int64_t* seeds;      // [B]
  const int64_t* steps;      // [B]
};

/// The better of two (score, token) candidates: the higher score, on a tie the lower token
/// (token -1 for none).
__device__ __forceinline__ void keep_better(float& score, int& token, float other_score, int other_token) {
  if (other_token < 0) return;
  if (token < 0 || other_score > score || (other_score == score && other_token < token)) {
    score = other_score;
    token = other_token;
  }
}

template <typename T, int kVec>
__global__ void sample_tokens_kernel(int64_t* __restrict tokens,  // [B]
                                     const T* __restrict logits,  // [B, vocab], rows row_stride apart
                                     int64_t row_stride, int vocab, SampleParams params) {
  const int64_t r = blockIdx.x;
  const T* row = logits + r * row_stride;
  const float temperature = params.temperature[r];
  const bool greedy = temperature == 0.0f;
  const float inv_temperature = greedy ? 1.0f : 1.0f / temperature;
  const uint64_t key = sample_row_key(static_cast<uint64_t>(params.seeds[r]), static_cast<uint64_t>(params.steps[r]));
  float best = -INFINITY;
  int best_token = -1;
  for (int i = threadIdx.x * kVec; i < vocab; i += blockDim.x * kVec) {
    T x[kVec];
    load_vec<T, kVec>(x, row + i);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float s = to_acc(x[j]) * inv_temperature;
      if (!greedy) {
        if (!(s + kMaxGumbel > best)) continue;  // cannot win (or NaN)
        s -= __logf(-__logf(bits_to_uniform(sample_bits(key, static_cast<uint32_t>(i + j)))));
      }
      if (s > best) best = s, best_token = i + j;
    }
  }
  // The block's best: within each warp, then across the warps.
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, best, offset);
    const int other_token = __shfl_xor_sync(0xffffffffu, best_token, offset);
    keep_better(best, best_token, other, other_token);
  }
  __shared__ float warp_best[32];
  __shared__ int warp_token[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_best[warp] = best, warp_token[warp] = best_token;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) keep_better(best, best_token, warp_best[w], warp_token[w]);
    tokens[r] = best_token < 0 ? 0 : best_token;  // every logit -inf or NaN: token 0, as argmax
  }
}

template <typename T>
cudaError_t sample_tokens(int64_t* tokens, const T* logits, int64_t rows, int64_t row_stride, int vocab,
                          SampleParams params, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  constexpr int kThreads = 1024;
  if (aligned16(logits, vocab, row_stride)) {
    sample_tokens_kernel<T, Vec16<T>::kSize><<<rows, kThreads, 0, stream>>>(tokens, logits, row_stride, vocab, params);
  } else {
    sample_tokens_kernel<T, 1><<<rows, kThreads, 0, stream>>>(tokens, logits, row_stride, vocab, params);
  }
  return cudaGetLastError();
}

}  // namespace pnl::kernels::cuda
