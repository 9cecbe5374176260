#include "pnl/core/scheduler.h"

#include <algorithm>
#include <limits>
#include <string>

namespace pnl::core {
namespace {

bool contains(const std::vector<TokenId>& ids, TokenId id) {
  return std::find(ids.begin(), ids.end(), id) != ids.end();
}

void require(bool ok, const std::string& message) {
  if (!ok) throw InvalidArgument(message);
}

}  // namespace

void SchedulerConfig::validate() const {
  require(num_blocks >= 1, "num_blocks must be >= 1, got " + std::to_string(num_blocks));
  require(block_size >= 8 && block_size <= 256 && (block_size & (block_size - 1)) == 0,
          "block_size must be a power of two from 8 to 256, got " + std::to_string(block_size));
  require(static_cast<int64_t>(num_blocks) * block_size <= std::numeric_limits<int32_t>::max(),
          "num_blocks * block_size must fit in int32 (KV slots are int32)");
  require(max_num_seqs >= 1, "max_num_seqs must be >= 1, got " + std::to_string(max_num_seqs));
  require(max_num_batched_tokens >= 1,
          "max_num_batched_tokens must be >= 1, got " + std::to_string(max_num_batched_tokens));
  require(max_model_len >= 2, "max_model_len must be >= 2, got " + std::to_string(max_model_len));
}

static const SchedulerConfig& validated(const SchedulerConfig& config) {
  config.validate();
  return config;
}

Scheduler::Scheduler(const SchedulerConfig& config, BlockHasher hasher)
    : config_(validated(config)),
      allocator_(config.num_blocks, config.block_size, config.enable_prefix_caching, hasher) {
  // Size the arena once for the largest step, so views handed out never dangle.
  const int64_t max_seqs = std::min(config_.max_num_seqs, config_.max_num_batched_tokens);
  const int64_t max_tokens = config_.max_num_batched_tokens;
  const int64_t max_width = std::min(blocks_for(config_.max_model_len), config_.num_blocks);
  const int64_t arena_size = 3 * max_tokens + 3 * max_seqs + 1 + max_seqs * max_width;
  require(arena_size <= (int64_t{1} << 30),
          "a step could need " + std::to_string(arena_size) + " int32 entries (max_num_seqs x blocks per sequence "
          "+ token budget); lower max_num_seqs, max_model_len or max_num_batched_tokens");
  output_.arena.assign(arena_size, 0);
  output_.seq_ids.reserve(max_seqs);
  output_.sampled_seq_ids.reserve(max_seqs);
  scheduled_.reserve(max_seqs);
  running_.reserve(config_.max_num_seqs);
}

int32_t Scheduler::blocks_for(int64_t num_tokens) const {
  return static_cast<int32_t>((num_tokens + config_.block_size - 1) / config_.block_size);
}

SeqId Scheduler::add(std::vector<TokenId> prompt, StopParams params) {
  const int64_t n = static_cast<int64_t>(prompt.size());
  require(n >= 1, "prompt must contain at least one token");
  require(n + 1 <= config_.max_model_len,
          "prompt has " + std::to_string(n) + " tokens; with one generated token that exceeds max_model_len=" +
              std::to_string(config_.max_model_len));
  require(params.max_tokens >= 1, "max_tokens must be >= 1, got " + std::to_string(params.max_tokens));
  require(params.min_tokens >= 0 && params.min_tokens <= params.max_tokens,
          "min_tokens must be in [0, max_tokens], got " + std::to_string(params.min_tokens));
  for (TokenId t : prompt) require(t >= 0, "token ids must be >= 0, got " + std::to_string(t));
  // The last sampled token never enters the cache, hence the - 1.
  const int64_t final_len = std::min<int64_t>(n + params.max_tokens, config_.max_model_len);
  const int32_t needed = blocks_for(final_len - 1);
  require(needed <= config_.num_blocks,
          "request needs up to " + std::to_string(needed) + " KV blocks (" + std::to_string(n) +
              " prompt tokens + max_tokens=" + std::to_string(params.max_tokens) + ") but the KV cache has only " +
              std::to_string(config_.num_blocks) + " blocks of " + std::to_string(config_.block_size) + " tokens");

  auto seq = std::make_unique<Sequence>();
  seq->id = next_id_++;
  seq->token_ids = std::move(prompt);
  seq->num_prompt_tokens = static_cast<int32_t>(n);
  seq->params = std::move(params);
  waiting_.push_back(seq.get());
  SeqId id = seq->id;
  seqs_.emplace(id, std::move(seq));
  return id;
}

const Sequence* Scheduler::find(SeqId id) const {
  auto it = seqs_.find(id);
  if (it == seqs_.end() || it->second->status == SequenceStatus::kFinished) return nullptr;
  return it->second.get();
}

bool Scheduler::abort(SeqId id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end() || it->second->status == SequenceStatus::kFinished) return false;
  Sequence* seq = it->second.get();
  if (seq->status == SequenceStatus::kWaiting) {
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), seq));
  } else {
    free_blocks(seq);
    running_.erase(std::find(running_.begin(), running_.end(), seq));
  }
  seq->status = SequenceStatus::kFinished;
  seq->finish_reason = FinishReason::kAbort;
  // A sequence in the pending step stays alive until postprocess() skips its token.
  if (!(step_pending_ && seq->num_scheduled_tokens > 0)) seqs_.erase(it);
  return true;
}

void Scheduler::free_blocks(Sequence* seq) {
  // Tail blocks first: they are the least likely to be shared, so they are reclaimed first.
  for (auto it = seq->block_table.rbegin(); it != seq->block_table.rend(); ++it) allocator_.release(*it);
  seq->block_table.clear();
}

void Scheduler::schedule_tokens(Sequence* seq, int32_t num_new_tokens) {
  seq->num_scheduled_tokens = num_new_tokens;
  budget_ -= num_new_tokens;
  scheduled_.push_back(seq);
}

void Scheduler::unschedule(Sequence* seq) {
  budget_ += seq->num_scheduled_tokens;
  seq->num_scheduled_tokens = 0;
  scheduled_.erase(std::find(scheduled_.begin(), scheduled_.end(), seq));
}

void Scheduler::preempt(Sequence* seq) {
  if (seq->num_scheduled_tokens > 0) unschedule(seq);
  free_blocks(seq);
  seq->num_computed_tokens = 0;
  seq->num_registered_blocks = 0;
  seq->status = SequenceStatus::kWaiting;
  ++seq->num_preemptions;
  running_.erase(std::find(running_.begin(), running_.end(), seq));
  waiting_.push_front(seq);
  output_.preempted_seq_ids.push_back(seq->id);
  preempted_this_step_ = true;
  ++num_preemptions_;
}

bool Scheduler::reserve_blocks(Sequence* seq, int32_t num_new_tokens) {
  const int32_t needed =
      blocks_for(seq->num_computed_tokens + num_new_tokens) - static_cast<int32_t>(seq->block_table.size());
  while (allocator_.num_free_blocks() < needed) {
    Sequence* victim = running_.back();
    preempt(victim);
    if (victim == seq) return false;
  }
  for (int32_t i = 0; i < needed; ++i) seq->block_table.push_back(allocator_.allocate());
  return true;
}

bool Scheduler::try_admit(Sequence* seq) {
  const int32_t bs = config_.block_size;
  const int32_t len = seq->size();
  hits_.clear();
  // At least the last token is computed, so its logits exist.
  allocator_.match_prefix(seq->token_ids.data(), len, (len - 1) / bs, hits_);
  const int32_t num_hits = static_cast<int32_t>(hits_.size());
  const int32_t num_hit_tokens = num_hits * bs;
  const int32_t n = std::min(len - num_hit_tokens, budget_);
  const int32_t needed = blocks_for(num_hit_tokens + n) - num_hits;
  if (allocator_.num_free_blocks() - allocator_.count_free(hits_) < needed) return false;

  for (BlockId b : hits_) allocator_.acquire(b);
  seq->block_table.assign(hits_.begin(), hits_.end());
  for (int32_t i = 0; i < needed; ++i) seq->block_table.push_back(allocator_.allocate());
  seq->num_computed_tokens = num_hit_tokens;
  seq->num_registered_blocks = num_hits;
  if (seq->num_preemptions == 0) seq->num_cached_tokens = num_hit_tokens;
  allocator_.record_prefix_query(len, num_hit_tokens);
  seq->status = SequenceStatus::kRunning;
  running_.push_back(seq);
  schedule_tokens(seq, n);
  return true;
}

const ScheduleOutput& Scheduler::schedule() {
  if (step_pending_) throw ProtocolError("schedule() called again before postprocess()");
  scheduled_.clear();
  output_.preempted_seq_ids.clear();
  budget_ = config_.max_num_batched_tokens;
  preempted_this_step_ = false;

  // Decodes first: they keep inter-token latency low.
  for (size_t i = 0; i < running_.size() && budget_ > 0; ++i) {
    Sequence* seq = running_[i];
    if (seq->num_uncomputed_tokens() == 1 && reserve_blocks(seq, 1)) schedule_tokens(seq, 1);
  }
  // Then the next chunk of prefills already under way.
  for (size_t i = 0; i < running_.size() && budget_ > 0; ++i) {
    Sequence* seq = running_[i];
    if (seq->num_scheduled_tokens > 0 || seq->num_uncomputed_tokens() <= 1) continue;
    const int32_t n = std::min(seq->num_uncomputed_tokens(), budget_);
    if (reserve_blocks(seq, n)) schedule_tokens(seq, n);
  }
  // Then new (or preempted) sequences, unless this step already had to preempt.
  while (!preempted_this_step_ && budget_ > 0 && !waiting_.empty() &&
         static_cast<int32_t>(running_.size()) < config_.max_num_seqs) {
    if (!try_admit(waiting_.front())) break;
    waiting_.pop_front();
  }
  if (scheduled_.empty() && has_unfinished()) {
    throw std::logic_error("internal error: scheduler made no progress with unfinished sequences");
  }
  build_output();
  step_pending_ = true;
  return output_;
}

void Scheduler::build_output() {
  ScheduleOutput& out = output_;
  const int32_t bs = config_.block_size;
  const int32_t shift = __builtin_ctz(static_cast<unsigned>(bs));
  int32_t num_tokens = 0, num_sampled = 0, width = 0, num_decode = 0;
  bool leading = true;
  for (Sequence* seq : scheduled_) {
    num_tokens += seq->num_scheduled_tokens;
    num_sampled += seq->num_computed_tokens + seq->num_scheduled_tokens == seq->size();
    width = std::max(width, static_cast<int32_t>(seq->block_table.size()));
    leading = leading && seq->num_scheduled_tokens == 1;
    num_decode += leading;
  }
  const int32_t num_seqs = static_cast<int32_t>(scheduled_.size());
  const int64_t sizes[ScheduleOutput::kNumFields] = {
      num_tokens, num_tokens, num_tokens, num_seqs + 1, num_seqs, num_sampled,
      static_cast<int64_t>(num_seqs) * width};
  out.offsets[0] = 0;
  for (int f = 0; f < ScheduleOutput::kNumFields; ++f) out.offsets[f + 1] = out.offsets[f] + sizes[f];
  out.num_tokens = num_tokens;
  out.num_seqs = num_seqs;
  out.num_sampled = num_sampled;
  out.num_decode_seqs = num_decode;
  out.block_table_width = width;
  out.max_seqlen_q = 0;
  out.max_context_len = 0;
  out.seq_ids.clear();
  out.sampled_seq_ids.clear();

  int32_t* input_ids = out.field(ScheduleOutput::kInputIds);
  int32_t* positions = out.field(ScheduleOutput::kPositions);
  int32_t* slot_mapping = out.field(ScheduleOutput::kSlotMapping);
  int32_t* cu_seqlens_q = out.field(ScheduleOutput::kCuSeqlensQ);
  int32_t* context_lens = out.field(ScheduleOutput::kContextLens);
  int32_t* sample_indices = out.field(ScheduleOutput::kSampleIndices);
  int32_t* block_tables = out.field(ScheduleOutput::kBlockTables);
  int32_t t = 0, k = 0;
  cu_seqlens_q[0] = 0;
  for (int32_t s = 0; s < num_seqs; ++s) {
    const Sequence* seq = scheduled_[s];
    const int32_t start = seq->num_computed_tokens;
    const int32_t end = start + seq->num_scheduled_tokens;
    const BlockId* table = seq->block_table.data();
    for (int32_t pos = start; pos < end; ++pos, ++t) {
      input_ids[t] = seq->token_ids[pos];
      positions[t] = pos;
      slot_mapping[t] = (table[pos >> shift] << shift) | (pos & (bs - 1));
    }
    cu_seqlens_q[s + 1] = t;
    context_lens[s] = end;
    if (end == seq->size()) {
      sample_indices[k++] = t - 1;
      out.sampled_seq_ids.push_back(seq->id);
    }
    int32_t* row = block_tables + static_cast<int64_t>(s) * width;
    const int32_t num_blocks = static_cast<int32_t>(seq->block_table.size());
    std::copy(table, table + num_blocks, row);
    std::fill(row + num_blocks, row + width, -1);
    out.seq_ids.push_back(seq->id);
    out.max_seqlen_q = std::max(out.max_seqlen_q, end - start);
    out.max_context_len = std::max(out.max_context_len, end);
  }
}

void Scheduler::register_full_blocks(Sequence* seq) {
  const int32_t full = seq->num_computed_tokens / config_.block_size;
  for (int32_t b = seq->num_registered_blocks; b < full; ++b) {
    allocator_.cache_full_block(seq->block_table[b], b > 0 ? seq->block_table[b - 1] : -1,
                                seq->token_ids.data() + static_cast<size_t>(b) * config_.block_size);
  }
  seq->num_registered_blocks = std::max(seq->num_registered_blocks, full);
}

void Scheduler::finish(Sequence* seq, FinishReason reason, TokenId stop_token) {
  free_blocks(seq);
  seq->status = SequenceStatus::kFinished;
  seq->finish_reason = reason;
  seq->stop_token = stop_token;
  finished_.push_back({seq->id, reason, stop_token, seq->num_generated_tokens(), seq->num_cached_tokens});
}

const std::vector<FinishedSequence>& Scheduler::postprocess(const TokenId* sampled, int64_t num_sampled) {
  if (!step_pending_) throw ProtocolError("postprocess() called without a pending schedule()");
  require(num_sampled == output_.num_sampled, "postprocess() expects " + std::to_string(output_.num_sampled) +
                                                  " sampled tokens, got " + std::to_string(num_sampled));
  for (int64_t i = 0; i < num_sampled; ++i) {
    require(sampled[i] >= 0, "sampled token ids must be >= 0, got " + std::to_string(sampled[i]));
  }
  finished_.clear();
  int64_t k = 0;
  bool any_finished = false;
  for (Sequence* seq : scheduled_) {
    const int32_t n = seq->num_scheduled_tokens;
    seq->num_scheduled_tokens = 0;
    const bool samples = seq->num_computed_tokens + n == seq->size();
    if (seq->status == SequenceStatus::kFinished) {  // aborted during the step
      k += samples;
      const SeqId id = seq->id;  // erase() destroys seq
      seqs_.erase(id);
      continue;
    }
    seq->num_computed_tokens += n;
    register_full_blocks(seq);
    if (!samples) continue;

    const TokenId token = sampled[k++];
    seq->token_ids.push_back(token);
    const StopParams& p = seq->params;
    FinishReason reason = FinishReason::kNone;
    TokenId stop_token = -1;
    if (seq->num_generated_tokens() >= p.min_tokens) {
      if (!p.ignore_eos && contains(p.eos_token_ids, token)) {
        reason = FinishReason::kStop;
      } else if (contains(p.stop_token_ids, token)) {
        reason = FinishReason::kStop;
        stop_token = token;
      }
    }
    if (reason == FinishReason::kNone &&
        (seq->num_generated_tokens() >= p.max_tokens || seq->size() >= config_.max_model_len)) {
      reason = FinishReason::kLength;
    }
    if (reason != FinishReason::kNone) {
      finish(seq, reason, stop_token);
      any_finished = true;
    }
  }
  scheduled_.clear();
  step_pending_ = false;
  if (any_finished) {
    std::erase_if(running_, [](const Sequence* s) { return s->status == SequenceStatus::kFinished; });
    for (const FinishedSequence& f : finished_) seqs_.erase(f.id);
  }
  return finished_;
}

}  // namespace pnl::core
