// One engine step's batch as flat int32 buffers, ready for the model runner.
#pragma once

#include <cstdint>
#include <vector>

#include "pnl/core/types.h"

namespace pnl::core {

/// Every array lives in one int32 arena, in this order, so the runner can move the whole step to a
/// device with a single copy:
///   input_ids      [num_tokens]
///   positions      [num_tokens]
///   slot_mapping   [num_tokens]              KV slot of each new token: block * block_size + offset
///   cu_seqlens_q   [num_seqs + 1]            start of each sequence's new tokens
///   context_lens   [num_seqs]                tokens in the cache after this step
///   sample_indices [num_sampled]             token index whose logits are sampled
///   block_tables   [num_seqs, block_table_width]   padded with -1
///   placeholder_rows    [num_placeholders]   input_ids rows whose token the previous step samples
///   placeholder_sources [num_placeholders]   that token's row among the previous step's sampled tokens
/// Sequences are ordered with the one-token (decode) sequences first. A sequence whose chunk ends
/// before its last token (chunked prefill) is not sampled. When a step is scheduled while the one
/// before is still pending (overlapped steps), a decode whose input token that step samples reads
/// input_ids 0 there: the runner writes input_ids[placeholder_rows] = previous sampled tokens
/// [placeholder_sources] on the device.
/// The arena is sized at construction for the largest possible step and never reallocated, so
/// views into it stay valid. The scheduler alternates two outputs, so a step's contents stay
/// until the schedule() after next.
struct ScheduleOutput {
  enum Field {
    kInputIds,
    kPositions,
    kSlotMapping,
    kCuSeqlensQ,
    kContextLens,
    kSampleIndices,
    kBlockTables,
    kPlaceholderRows,
    kPlaceholderSources,
    kNumFields
  };

  int32_t num_tokens = 0;
  int32_t num_seqs = 0;
  int32_t num_sampled = 0;
  int32_t num_decode_seqs = 0;   // leading sequences with exactly one new token
  int32_t block_table_width = 0;
  int32_t max_seqlen_q = 0;
  int32_t max_context_len = 0;
  int32_t num_placeholders = 0;  // decode inputs that the previous, still pending step samples

  std::vector<int32_t> arena;
  int64_t offsets[kNumFields + 1] = {};  // field i is arena[offsets[i], offsets[i + 1])
  std::vector<SeqId> seq_ids;            // [num_seqs] batch order
  std::vector<SeqId> sampled_seq_ids;    // [num_sampled] order of postprocess()'s tokens
  std::vector<SeqId> preempted_seq_ids;  // sent back to the waiting queue during this step

  int32_t* field(Field f) { return arena.data() + offsets[f]; }
  const int32_t* field(Field f) const { return arena.data() + offsets[f]; }
  int64_t field_size(Field f) const { return offsets[f + 1] - offsets[f]; }
  int64_t arena_size() const { return offsets[kNumFields]; }
};

}  // namespace pnl::core
