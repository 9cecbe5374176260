// Where the query tiles of a CUDA prefill launch come from, without reading cu_seqlens_q on the
// host. Plain C++ (host and device), so googletest checks the arithmetic.
//
// Sequence s owns the tile slots [begin(s), begin(s + 1)) with begin(s) = cu[s] / block_m + s.
// It needs ceil(q_len / block_m) of them and always has enough: floor((a + q) / m) - floor(a / m)
// >= floor(q / m) >= ceil(q / m) - 1. begin grows by at least 1 per sequence, so a slot's owner is
// found by binary search, and the slots number T / block_m + S in all: at most S more than the
// tiles, each of which exits at once.
#pragma once

#include <cstdint>

#include "pnl/kernels/rows.h"  // PNL_HOST_DEVICE

namespace pnl::kernels {

/// Query rows per tile of the tensor-core prefill kernel.
inline constexpr int kPrefillBlockM = 64;

struct PrefillTile {
  int32_t seq;          // the sequence
  int64_t first_token;  // its first new token in the tile; >= q_len: an empty slot
};

/// Slots of a launch over num_tokens new tokens of num_seqs sequences.
PNL_HOST_DEVICE inline int64_t prefill_num_slots(int64_t num_tokens, int64_t num_seqs, int block_m) {
  return num_tokens / block_m + num_seqs;
}

/// First slot of sequence s, whose new tokens start at cu_s = cu_seqlens_q[s].
PNL_HOST_DEVICE inline int64_t prefill_slot_begin(int32_t cu_s, int32_t s, int block_m) {
  return cu_s / block_m + s;
}

/// The tile of slot (0 <= slot < prefill_num_slots, num_seqs >= 1): the last sequence whose first
/// slot is at or before it.
PNL_HOST_DEVICE inline PrefillTile prefill_tile_of_slot(const int32_t* cu_seqlens_q, int32_t num_seqs, int64_t slot,
                                                        int block_m) {
  int32_t lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo + 1) / 2;
    if (prefill_slot_begin(cu_seqlens_q[mid], mid, block_m) <= slot) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return {lo, (slot - prefill_slot_begin(cu_seqlens_q[lo], lo, block_m)) * block_m};
}

}  // namespace pnl::kernels
