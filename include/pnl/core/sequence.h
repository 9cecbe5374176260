// One request's token stream and its place in the KV cache.
#pragma once

#include <cstdint>
#include <vector>

#include "pnl/core/types.h"

namespace pnl::core {

/// Placeholder in token_ids for a token that a pending step samples (Scheduler, overlapped steps).
inline constexpr TokenId kPlaceholderToken = -1;

struct Sequence {
  SeqId id = -1;
  std::vector<TokenId> token_ids;       // prompt, then generated tokens, then num_placeholders placeholders
  int32_t num_prompt_tokens = 0;
  int32_t num_computed_tokens = 0;      // tokens whose KV is in the cache or written by a pending step
  int32_t num_cached_tokens = 0;        // of the prompt, found in the prefix cache at first admission
  int32_t num_registered_blocks = 0;    // block_table[0, this) are in the prefix cache
  int32_t num_scheduled_tokens = 0;     // new tokens of the step being scheduled, 0 when not in it
  int32_t num_preemptions = 0;
  int32_t num_placeholders = 0;         // trailing token_ids sampled by pending steps, not known yet
  int32_t newest_sample_row = -1;       // row of the newest placeholder among its step's sampled tokens
  int32_t num_pending_steps = 0;        // scheduled steps with this sequence that await postprocess()
  std::vector<BlockId> block_table;
  StopParams params;
  SequenceStatus status = SequenceStatus::kWaiting;
  FinishReason finish_reason = FinishReason::kNone;
  TokenId stop_token = -1;              // the stop token id that finished it, -1 otherwise

  int32_t size() const { return static_cast<int32_t>(token_ids.size()); }  // placeholders included
  int32_t num_known_tokens() const { return size() - num_placeholders; }
  int32_t num_generated_tokens() const { return num_known_tokens() - num_prompt_tokens; }
  int32_t num_uncomputed_tokens() const { return size() - num_computed_tokens; }
};

}  // namespace pnl::core
