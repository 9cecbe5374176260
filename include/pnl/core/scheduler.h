// Continuous batching: which sequences run each step, with how many tokens, in which KV blocks.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <unordered_map>
#include <vector>

#include "pnl/core/block_allocator.h"
#include "pnl/core/schedule_output.h"
#include "pnl/core/sequence.h"
#include "pnl/core/types.h"

namespace pnl::core {

struct SchedulerConfig {
  int32_t num_blocks = 1024;
  int32_t block_size = 16;
  int32_t max_num_seqs = 256;
  int32_t max_num_batched_tokens = 8192;  // token budget of one step, decodes and prefill chunks
  int32_t max_model_len = 4096;           // prompt + generated tokens of one sequence
  bool enable_prefix_caching = true;

  void validate() const;  // throws InvalidArgument
};

struct FinishedSequence {
  SeqId id;
  FinishReason reason;
  TokenId stop_token;  // the stop token id that finished it, -1 otherwise (EOS, length, abort)
  int32_t num_generated_tokens;
  int32_t num_cached_tokens;
};

/// The engine loop is: schedule() -> run the model on the output -> postprocess(sampled tokens).
///
/// Each step puts the one-token (decode) sequences first, then continues chunked prefills, then
/// admits waiting sequences (FIFO) into what is left of the token budget. When KV blocks run out,
/// the newest running sequence is preempted: its blocks are freed and it goes back to the front of
/// the waiting queue with all its tokens, to be recomputed (prefix hits included) later.
/// Every admitted sequence fits the pool on its own, so the oldest always makes progress.
///
/// Overlapped steps: the next step may be scheduled while one is pending, so that the host plans
/// step N + 1 while the device runs step N. A token step N samples is then a placeholder: the
/// sequence decodes it in step N + 1 from the device (ScheduleOutput's placeholder fields), and
/// postprocess() of step N fills it in and applies the stop rules. A sequence that step N
/// finishes may still have a row in step N + 1, whose token postprocess() drops. A sequence whose
/// pending token is its last (max_tokens, max_model_len) is not scheduled again, nor is a waiting
/// one admitted before its pending token is known.
///
/// Not thread-safe: the engine loop owns it.
class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& config, BlockHasher hasher = hash_block);

  /// Queues a request and returns its id. Throws InvalidArgument for a request that can never
  /// run: empty prompt, prompt + 1 > max_model_len, more KV blocks than the pool, bad params.
  SeqId add(std::vector<TokenId> prompt, StopParams params);
  /// Finishes a sequence at any time and frees its blocks. Returns false for an unknown id.
  bool abort(SeqId id);
  /// Finishes a live sequence for a reason found outside (a stop string) and frees its blocks,
  /// as abort() does, and reports it as postprocess() would; nullopt for an unknown id.
  std::optional<FinishedSequence> finish(SeqId id, FinishReason reason);

  /// Plans the next step, with at most one step pending (overlapped steps); each step, empty or
  /// not, is postprocess()ed in turn. Non-empty whenever has_unfinished() and no step is pending;
  /// with one pending, it may be empty: every running sequence waits for its pending token.
  const ScheduleOutput& schedule();
  /// Fills in the tokens the oldest pending step sampled (one per sampled sequence, in its
  /// ScheduleOutput order) and finishes sequences. Returns the sequences it finished.
  const std::vector<FinishedSequence>& postprocess(const TokenId* sampled, int64_t num_sampled);

  bool has_unfinished() const { return !waiting_.empty() || !running_.empty(); }
  bool step_pending() const { return !pending_.empty(); }
  int32_t num_pending_steps() const { return static_cast<int32_t>(pending_.size()); }
  int32_t num_waiting() const { return static_cast<int32_t>(waiting_.size()); }
  int32_t num_running() const { return static_cast<int32_t>(running_.size()); }
  int64_t num_preemptions() const { return num_preemptions_; }
  /// A live (waiting or running) sequence, or nullptr.
  const Sequence* find(SeqId id) const;
  const BlockAllocator& allocator() const { return allocator_; }
  /// BlockAllocator::reset_prefix_cache(): succeeds only when no sequence holds KV blocks.
  bool reset_prefix_cache() { return allocator_.reset_prefix_cache(); }
  const SchedulerConfig& config() const { return config_; }
  const ScheduleOutput& last_output() const { return outputs_[last_output_]; }

 private:
  /// A scheduled step awaiting postprocess(): its sequences, and each one's row among the step's
  /// sampled tokens (-1: not sampled).
  struct PendingEntry {
    Sequence* seq;
    int32_t sample_row;
  };
  struct PendingStep {
    std::vector<PendingEntry> entries;
    int32_t num_sampled = 0;
  };

  int32_t blocks_for(int64_t num_tokens) const;
  bool last_token_pending(const Sequence* seq) const;
  void commit_step(const ScheduleOutput& out);
  void remove_finished(const std::vector<Sequence*>& ended);
  bool reserve_blocks(Sequence* seq, int32_t num_new_tokens);
  void schedule_tokens(Sequence* seq, int32_t num_new_tokens);
  void unschedule(Sequence* seq);
  void preempt(Sequence* seq);
  bool try_admit(Sequence* seq);
  void free_blocks(Sequence* seq);
  void register_full_blocks(Sequence* seq);
  FinishedSequence finish_sequence(Sequence* seq, FinishReason reason, TokenId stop_token);
  void build_output(ScheduleOutput& out);

  SchedulerConfig config_;
  BlockAllocator allocator_;
  std::unordered_map<SeqId, std::unique_ptr<Sequence>> seqs_;
  std::deque<Sequence*> waiting_;
  std::vector<Sequence*> running_;    // admission order, oldest first
  std::vector<Sequence*> scheduled_;  // the step being scheduled, batch order
  int32_t budget_ = 0;                // tokens left in this step
  bool preempted_this_step_ = false;
  std::deque<PendingStep> pending_;   // scheduled, not yet postprocessed; oldest first
  SeqId next_id_ = 0;
  int64_t num_preemptions_ = 0;
  ScheduleOutput outputs_[2];         // alternate, so the pending step's output stays valid
  int32_t last_output_ = 1;
  std::vector<FinishedSequence> finished_;
  std::vector<BlockId> hits_;          // scratch for prefix matches
};

}  // namespace pnl::core
