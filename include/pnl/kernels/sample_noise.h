// The random numbers of sample_tokens: a counter-based hash of (request seed, step, token id), so a
// row draws the same noise for a token whatever else is in its batch, on the CPU and on the GPU.
// Torch-free; ops/ref.py computes the same bits in torch.
//
// A row's key mixes its seed with its step (the tokens it has generated) through SplitMix64's
// finaliser; a token's 24 random bits come from two rounds of murmur3's 32-bit finaliser over the
// token id and the key's two halves (public-domain constants).
#pragma once

#include <cstdint>

#include "pnl/kernels/host_device.h"

namespace pnl::kernels {

PNL_HOST_DEVICE inline uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

PNL_HOST_DEVICE inline uint32_t mix32(uint32_t x) {
  x = (x ^ (x >> 16)) * 0x85EBCA6Bu;
  x = (x ^ (x >> 13)) * 0xC2B2AE35u;
  return x ^ (x >> 16);
}

/// The key of a row: its request's seed, and the number of tokens it has generated so far.
PNL_HOST_DEVICE inline uint64_t sample_row_key(uint64_t seed, uint64_t step) {
  return mix64(seed * 0x9E3779B97F4A7C15ull + step);
}

/// 24 random bits for token `token` of the row keyed `key`.
PNL_HOST_DEVICE inline uint32_t sample_bits(uint64_t key, uint32_t token) {
  return mix32(mix32(token ^ static_cast<uint32_t>(key)) + static_cast<uint32_t>(key >> 32)) >> 8;
}

/// Those bits as a uniform in (0, 1): never 0 or 1, so -log(-log(u)) is finite.
PNL_HOST_DEVICE inline float bits_to_uniform(uint32_t bits) {
  return (static_cast<float>(bits) + 0.5f) * (1.0f / 16777216.0f);
}

/// The largest Gumbel noise -log(-log(u)) any token can draw (u <= 1 - 2^-25 gives 17.33), with a
/// margin for a fast log's error: a token whose logit / T + this is below the best score so far
/// cannot win, and its noise need not be drawn.
inline constexpr float kMaxGumbel = 18.0f;

}  // namespace pnl::kernels
