// 64-bit chained hash of a full KV block's token ids: the prefix cache's lookup key.
#pragma once

#include <cstdint>

#include "pnl/core/types.h"

namespace pnl::core {

/// Signature of a block hash: key of the parent block (0 for the first block) and the block's tokens.
/// Tests swap in a constant function to force collisions.
using BlockHasher = uint64_t (*)(uint64_t parent_key, const TokenId* tokens, int32_t num_tokens);

/// Finalizer from MurmurHash3's fmix64 (public domain constants): full avalanche in 64 bits.
inline uint64_t mix64(uint64_t h) {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ULL;
  h ^= h >> 33;
  return h;
}

/// Folds two tokens per 64-bit word into the state, so a block of 16 tokens costs 8 multiplies.
inline uint64_t hash_block(uint64_t parent_key, const TokenId* tokens, int32_t num_tokens) {
  uint64_t h = mix64(parent_key ^ 0x9e3779b97f4a7c15ULL) ^ static_cast<uint64_t>(num_tokens);
  int32_t i = 0;
  for (; i + 1 < num_tokens; i += 2) {
    uint64_t word = static_cast<uint32_t>(tokens[i]) | (static_cast<uint64_t>(static_cast<uint32_t>(tokens[i + 1])) << 32);
    h = (h ^ word) * 0x9fb21c651e98df25ULL;
    h ^= h >> 29;
  }
  if (i < num_tokens) h = (h ^ static_cast<uint32_t>(tokens[i])) * 0x9fb21c651e98df25ULL;
  return mix64(h);
}

}  // namespace pnl::core
