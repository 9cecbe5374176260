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
  const int64_t arena_size = 3 * max_tokens + 5 * max_seqs + 1 + max_seqs * max_width;
  require(arena_size <= (int64_t{1} << 30),
          "a step could need " + std::to_string(arena_size) + " int32 entries (max_num_seqs x blocks per sequence "
          "+ token budget); lower max_num_seqs, max_model_len or max_num_batched_tokens");
  for (ScheduleOutput& out : outputs_) {
    out.arena.assign(arena_size, 0);
    out.seq_ids.reserve(max_seqs);
    out.sampled_seq_ids.reserve(max_seqs);
  }
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
  // A sequence in a pending step stays alive until postprocess() skips its token.
  if (seq->num_pending_steps == 0) seqs_.erase(it);
  return true;
}

std::optional<FinishedSequence> Scheduler::finish(SeqId id, FinishReason reason) {
  auto it = seqs_.find(id);
  if (it == seqs_.end() || it->second->status == SequenceStatus::kFinished) return std::nullopt;
  Sequence* seq = it->second.get();
  const FinishedSequence f = finish_sequence(seq, reason, -1);
  remove_finished({seq});
  return f;
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
  outputs_[1 - last_output_].preempted_seq_ids.push_back(seq->id);
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

bool Scheduler::last_token_pending(const Sequence* seq) const {
  // Its newest token is a placeholder that will end it by length: another step would be wasted,
  // and could need a KV block past the request's own.
  return seq->num_placeholders > 0 &&
         (seq->size() - seq->num_prompt_tokens >= seq->params.max_tokens || seq->size() >= config_.max_model_len);
}

const ScheduleOutput& Scheduler::schedule() {
  if (pending_.size() >= 2) throw ProtocolError("schedule() called with two steps pending; postprocess() first");
  ScheduleOutput& out = outputs_[1 - last_output_];
  scheduled_.clear();
  out.preempted_seq_ids.clear();
  budget_ = config_.max_num_batched_tokens;
  preempted_this_step_ = false;

  // Decodes first: they keep inter-token latency low.
  for (size_t i = 0; i < running_.size() && budget_ > 0; ++i) {
    Sequence* seq = running_[i];
    if (seq->num_uncomputed_tokens() == 1 && !last_token_pending(seq) && reserve_blocks(seq, 1)) {
      schedule_tokens(seq, 1);
    }
  }
  // Then the next chunk of prefills already under way.
  for (size_t i = 0; i < running_.size() && budget_ > 0; ++i) {
    Sequence* seq = running_[i];
    if (seq->num_scheduled_tokens > 0 || seq->num_uncomputed_tokens() <= 1) continue;
    const int32_t n = std::min(seq->num_uncomputed_tokens(), budget_);
    if (reserve_blocks(seq, n)) schedule_tokens(seq, n);
  }
  // Then new (or preempted) sequences, unless this step already had to preempt. A preempted one
  // whose sampled token is still pending waits for it: it recomputes every token.
  while (!preempted_this_step_ && budget_ > 0 && !waiting_.empty() && waiting_.front()->num_placeholders == 0 &&
         static_cast<int32_t>(running_.size()) < config_.max_num_seqs) {
    if (!try_admit(waiting_.front())) break;
    waiting_.pop_front();
  }
  if (scheduled_.empty() && has_unfinished() && pending_.empty()) {
    throw std::logic_error("internal error: scheduler made no progress with unfinished sequences");
  }
  build_output(out);
  last_output_ = 1 - last_output_;
  commit_step(out);
  return out;
}

/// The step becomes pending: its tokens count as computed (their KV is written before any later
/// step reads it), and each sampled sequence gets a placeholder for the token it will draw.
void Scheduler::commit_step(const ScheduleOutput& out) {
  PendingStep step;
  step.num_sampled = out.num_sampled;
  step.entries.reserve(scheduled_.size());
  int32_t k = 0;
  for (Sequence* seq : scheduled_) {
    const bool samples = seq->num_computed_tokens + seq->num_scheduled_tokens == seq->size();
    step.entries.push_back({seq, samples ? k : -1});
    seq->num_computed_tokens += seq->num_scheduled_tokens;
    seq->num_scheduled_tokens = 0;
    ++seq->num_pending_steps;
    if (samples) {
      seq->token_ids.push_back(kPlaceholderToken);
      ++seq->num_placeholders;
      seq->newest_sample_row = k++;
    }
  }
  pending_.push_back(std::move(step));
}

void Scheduler::build_output(ScheduleOutput& out) {
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
  int32_t num_placeholders = 0;  // decode inputs the pending step samples
  for (Sequence* seq : scheduled_) {
    num_placeholders += std::max(0, seq->num_computed_tokens + seq->num_scheduled_tokens - seq->num_known_tokens());
  }
  const int64_t sizes[ScheduleOutput::kNumFields] = {
      num_tokens, num_tokens, num_tokens, num_seqs + 1, num_seqs, num_sampled,
      static_cast<int64_t>(num_seqs) * width, num_placeholders, num_placeholders};
  out.offsets[0] = 0;
  for (int f = 0; f < ScheduleOutput::kNumFields; ++f) out.offsets[f + 1] = out.offsets[f] + sizes[f];
  out.num_tokens = num_tokens;
  out.num_seqs = num_seqs;
  out.num_sampled = num_sampled;
  out.num_decode_seqs = num_decode;
  out.block_table_width = width;
  out.max_seqlen_q = 0;
  out.max_context_len = 0;
  out.num_placeholders = num_placeholders;
  out.seq_ids.clear();
  out.sampled_seq_ids.clear();

  int32_t* input_ids = out.field(ScheduleOutput::kInputIds);
  int32_t* positions = out.field(ScheduleOutput::kPositions);
  int32_t* slot_mapping = out.field(ScheduleOutput::kSlotMapping);
  int32_t* cu_seqlens_q = out.field(ScheduleOutput::kCuSeqlensQ);
  int32_t* context_lens = out.field(ScheduleOutput::kContextLens);
  int32_t* sample_indices = out.field(ScheduleOutput::kSampleIndices);
  int32_t* block_tables = out.field(ScheduleOutput::kBlockTables);
  int32_t* placeholder_rows = out.field(ScheduleOutput::kPlaceholderRows);
  int32_t* placeholder_sources = out.field(ScheduleOutput::kPlaceholderSources);
  int32_t t = 0, k = 0, p = 0;
  cu_seqlens_q[0] = 0;
  for (int32_t s = 0; s < num_seqs; ++s) {
    const Sequence* seq = scheduled_[s];
    const int32_t start = seq->num_computed_tokens;
    const int32_t end = start + seq->num_scheduled_tokens;
    const BlockId* table = seq->block_table.data();
    for (int32_t pos = start; pos < end; ++pos, ++t) {
      input_ids[t] = seq->token_ids[pos];
      if (pos >= seq->num_known_tokens()) {  // only the one pending step has placeholders left
        input_ids[t] = 0;
        placeholder_rows[p] = t;
        placeholder_sources[p++] = seq->newest_sample_row;
      }
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
  // A block is cached once its tokens are known (a hash needs them) and their KV is written or
  // being written by a pending step: any step that could read it runs after that one.
  const int32_t full = std::min(seq->num_computed_tokens, seq->num_known_tokens()) / config_.block_size;
  for (int32_t b = seq->num_registered_blocks; b < full; ++b) {
    allocator_.cache_full_block(seq->block_table[b], b > 0 ? seq->block_table[b - 1] : -1,
                                seq->token_ids.data() + static_cast<size_t>(b) * config_.block_size);
  }
  seq->num_registered_blocks = std::max(seq->num_registered_blocks, full);
}

FinishedSequence Scheduler::finish_sequence(Sequence* seq, FinishReason reason, TokenId stop_token) {
  free_blocks(seq);
  seq->token_ids.resize(seq->num_known_tokens());  // a later pending step's token is dropped
  seq->num_placeholders = 0;
  seq->status = SequenceStatus::kFinished;
  seq->finish_reason = reason;
  seq->stop_token = stop_token;
  return {seq->id, reason, stop_token, seq->num_generated_tokens(), seq->num_cached_tokens};
}

/// Takes the ended sequences out of the queues, and forgets those that no pending step holds.
void Scheduler::remove_finished(const std::vector<Sequence*>& ended) {
  const auto done = [](const Sequence* s) { return s->status == SequenceStatus::kFinished; };
  std::erase_if(running_, done);
  std::erase_if(waiting_, done);
  for (Sequence* seq : ended) {
    if (seq->num_pending_steps == 0) seqs_.erase(seq->id);
  }
}

const std::vector<FinishedSequence>& Scheduler::postprocess(const TokenId* sampled, int64_t num_sampled) {
  if (pending_.empty()) throw ProtocolError("postprocess() called without a pending schedule()");
  PendingStep& step = pending_.front();
  require(num_sampled == step.num_sampled, "postprocess() expects " + std::to_string(step.num_sampled) +
                                               " sampled tokens, got " + std::to_string(num_sampled));
  for (int64_t i = 0; i < num_sampled; ++i) {
    require(sampled[i] >= 0, "sampled token ids must be >= 0, got " + std::to_string(sampled[i]));
  }
  finished_.clear();
  std::vector<Sequence*> ended;
  for (const PendingEntry& entry : step.entries) {
    Sequence* seq = entry.seq;
    --seq->num_pending_steps;
    if (seq->status == SequenceStatus::kFinished) {  // aborted or finished since: its token is dropped
      ended.push_back(seq);
      continue;
    }
    if (entry.sample_row >= 0) {
      const TokenId token = sampled[entry.sample_row];
      seq->token_ids[seq->num_known_tokens()] = token;  // the oldest placeholder
      --seq->num_placeholders;
    }
    // A sequence preempted since its step was scheduled waits with no blocks to cache.
    if (seq->status == SequenceStatus::kRunning) register_full_blocks(seq);
    if (entry.sample_row < 0) continue;

    const TokenId token = seq->token_ids[seq->num_known_tokens() - 1];
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
        (seq->num_generated_tokens() >= p.max_tokens || seq->num_known_tokens() >= config_.max_model_len)) {
      reason = FinishReason::kLength;
    }
    if (reason != FinishReason::kNone) {
      finished_.push_back(finish_sequence(seq, reason, stop_token));
      ended.push_back(seq);
    }
  }
  pending_.pop_front();
  if (!ended.empty()) remove_finished(ended);
  return finished_;
}

}  // namespace pnl::core
