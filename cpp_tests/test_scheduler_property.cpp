// Randomized adds, steps and aborts against the Scheduler, with its invariants checked after every
// operation through the public API only; in lockstep, or with each step scheduled while the one
// before is pending (overlapped).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "pnl/core/hash.h"
#include "pnl/core/scheduler.h"

using namespace pnl::core;

namespace {

constexpr TokenId kEos = 1, kStop = 2;

// Puts every block in one hash bucket: only the allocator's token and parent checks keep chains apart.
uint64_t constant_hash(uint64_t, const TokenId*, int32_t) { return 42; }

struct Workload {
  std::string name;
  SchedulerConfig config;
  int32_t prefix_len;      // prompts start with a cut of one of a few shared prefixes of this length
  int32_t max_suffix;      // followed by up to this many random tokens
  int32_t max_new_tokens;  // max_tokens is drawn from [1, this]
  bool preempts;           // the pool is small enough that preemption must happen
  BlockHasher hasher = hash_block;
};

// What this test knows about a live sequence, from its own bookkeeping.
struct Tracked {
  int32_t prompt_len;
  StopParams params;
  int32_t generated = 0;
  TokenId last = -1;
};

class PropertyRun {
 public:
  PropertyRun(const Workload& workload, uint32_t seed, bool overlapped)
      : workload_(workload), overlapped_(overlapped), s_(workload.config, workload.hasher), rng_(seed),
        kv_(static_cast<size_t>(workload.config.num_blocks) * workload.config.block_size, -1) {
    for (int i = 0; i < 3; ++i) prefixes_.push_back(random_tokens(workload.prefix_len));
  }

  void run(int num_ops) {
    for (int i = 0; i < num_ops && !::testing::Test::HasFailure(); ++i) {
      const int r = uniform(0, 99);
      if (r < 15 || !s_.has_unfinished()) {
        add();
      } else if (r < 92) {
        step();
      } else if (r < 97) {
        abort(random_live_id());
      } else if (!ended_.empty()) {
        abort(std::next(ended_.begin(), uniform(0, int(ended_.size()) - 1))->first);  // must answer false
      }
      check_invariants();
    }
  }

  // Steps until nothing is left, then checks that everything was given back exactly once.
  void drain() {
    for (int n = 0; (s_.has_unfinished() || !inflight_.empty()) && !::testing::Test::HasFailure(); ++n) {
      ASSERT_LT(n, 50000) << "scheduler does not finish";
      step();
      check_invariants();
    }
    EXPECT_TRUE(live_.empty());
    EXPECT_EQ(s_.allocator().num_used_blocks(), 0);
    EXPECT_EQ(s_.allocator().num_free_blocks(), workload_.config.num_blocks);
    EXPECT_EQ(ended_.size(), static_cast<size_t>(num_added_));
    for (const auto& [id, times] : ended_) EXPECT_EQ(times, 1) << "seq " << id;
    // The workload exercises what it claims to.
    EXPECT_GT(num_added_, 0);
    EXPECT_GT(num_rejected_, 0);
    EXPECT_GT(num_steps_, 0);
    if (workload_.preempts) {
      EXPECT_GT(s_.num_preemptions(), 0);
    }
    if (workload_.config.enable_prefix_caching) {
      EXPECT_GT(s_.allocator().stats().prefix_hits, 0);
    }
  }

  int num_steps() const { return num_steps_; }

 private:
  int uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }
  bool chance(int percent) { return uniform(0, 99) < percent; }

  std::vector<TokenId> random_tokens(int32_t n) {
    std::vector<TokenId> t(n);
    for (TokenId& x : t) x = uniform(0, 999);
    return t;
  }

  SeqId random_live_id() {
    if (live_.empty() || chance(10)) return 1'000'000 + uniform(0, 10);  // never issued
    return std::next(live_.begin(), uniform(0, int(live_.size()) - 1))->first;
  }

  // The request rules, restated: a non-empty prompt of ids >= 0 that leaves room for one token,
  // sane stop params, and a KV footprint (every token but the last sampled one) that fits the pool.
  bool expect_valid(const std::vector<TokenId>& prompt, const StopParams& p) const {
    const SchedulerConfig& c = workload_.config;
    const int64_t n = static_cast<int64_t>(prompt.size());
    if (n < 1 || n + 1 > c.max_model_len) return false;
    if (p.max_tokens < 1 || p.min_tokens < 0 || p.min_tokens > p.max_tokens) return false;
    if (std::any_of(prompt.begin(), prompt.end(), [](TokenId t) { return t < 0; })) return false;
    const int64_t cached = std::min<int64_t>(n + p.max_tokens, c.max_model_len) - 1;
    return (cached + c.block_size - 1) / c.block_size <= c.num_blocks;
  }

  void add() {
    const std::vector<TokenId>& prefix = prefixes_[uniform(0, int(prefixes_.size()) - 1)];
    std::vector<TokenId> prompt(prefix.begin(), prefix.begin() + uniform(0, workload_.prefix_len));
    const std::vector<TokenId> suffix = random_tokens(uniform(0, workload_.max_suffix));
    prompt.insert(prompt.end(), suffix.begin(), suffix.end());
    StopParams p;
    p.max_tokens = uniform(1, workload_.max_new_tokens);
    p.min_tokens = chance(30) ? uniform(0, p.max_tokens) : 0;
    p.ignore_eos = chance(20);
    p.eos_token_ids = {kEos};
    if (chance(70)) p.stop_token_ids = {kStop};
    switch (uniform(0, 24)) {  // now and then a request that breaks a rule
      case 0: prompt.clear(); break;
      case 1:
        p.max_tokens = 0;
        p.min_tokens = 0;
        break;
      case 2: p.min_tokens = p.max_tokens + 1; break;
      case 3: if (!prompt.empty()) prompt[uniform(0, int(prompt.size()) - 1)] = -1; break;
      case 4: prompt.resize(workload_.config.max_model_len, 5); break;
      default: break;
    }
    const bool valid = expect_valid(prompt, p);
    try {
      const SeqId id = s_.add(prompt, p);
      EXPECT_TRUE(valid) << "accepted a request that can never run";
      EXPECT_FALSE(live_.count(id) || ended_.count(id)) << "id reused: " << id;
      live_[id] = {static_cast<int32_t>(prompt.size()), p};
      ++num_added_;
    } catch (const InvalidArgument&) {
      EXPECT_FALSE(valid) << "rejected a valid request: " << prompt.size() << " tokens, max_tokens " << p.max_tokens;
      ++num_rejected_;
    }
  }

  void abort(SeqId id) {
    const bool known = live_.count(id) > 0;
    EXPECT_EQ(s_.abort(id), known) << "abort " << id;
    if (!known) return;
    live_.erase(id);
    ++ended_[id];
    EXPECT_EQ(s_.find(id), nullptr);
  }

  // Lockstep: schedule, then postprocess. Overlapped: schedule, then postprocess the step before.
  void step() {
    if (s_.has_unfinished()) schedule();
    if (!overlapped_ || inflight_.size() == 2 || !s_.has_unfinished()) {
      if (!inflight_.empty()) postprocess();
    }
  }

  void schedule() {
    const bool had_work = s_.has_unfinished() && !s_.step_pending();
    const ScheduleOutput& out = s_.schedule();
    ++num_steps_;
    if (had_work) {
      ASSERT_GE(out.num_seqs, 1) << "empty step with unfinished sequences";
    }
    check_output(out);

    InFlight step{out.sampled_seq_ids, {}};
    for (int32_t k = 0; k < out.num_sampled; ++k) {
      const int r = uniform(0, 99);
      step.tokens.push_back(r < 6 ? kEos : r < 10 ? kStop : uniform(3, 999));
    }
    inflight_.push_back(std::move(step));
    if (chance(5)) {  // the request is cancelled while the model runs
      abort(chance(50) && out.num_seqs > 0 ? out.seq_ids[uniform(0, out.num_seqs - 1)] : random_live_id());
    }
  }

  void postprocess() {
    const InFlight oldest = inflight_.front();
    inflight_.pop_front();
    const std::vector<TokenId>& sampled = oldest.tokens;
    const std::vector<SeqId>& sampled_ids = oldest.sampled_ids;

    // Which sequences the finishing rules end with these tokens, from this test's own counts.
    std::map<SeqId, std::pair<FinishReason, TokenId>> expected;
    for (size_t k = 0; k < sampled_ids.size(); ++k) {
      auto it = live_.find(sampled_ids[k]);
      if (it == live_.end()) continue;  // ended while the step was pending: its token is dropped
      Tracked& t = it->second;
      const TokenId token = sampled[k];
      ++t.generated;
      t.last = token;
      const StopParams& p = t.params;
      if (t.generated >= p.min_tokens && !p.ignore_eos && token == kEos) {
        expected[it->first] = {FinishReason::kStop, -1};
      } else if (t.generated >= p.min_tokens &&
                 std::count(p.stop_token_ids.begin(), p.stop_token_ids.end(), token)) {
        expected[it->first] = {FinishReason::kStop, token};
      } else if (t.generated >= p.max_tokens || t.prompt_len + t.generated >= workload_.config.max_model_len) {
        expected[it->first] = {FinishReason::kLength, -1};
      }
    }

    const std::vector<FinishedSequence>& finished =
        s_.postprocess(sampled.data(), static_cast<int64_t>(sampled.size()));
    EXPECT_EQ(finished.size(), expected.size());
    for (const FinishedSequence& f : finished) {
      auto it = live_.find(f.id);
      ASSERT_NE(it, live_.end()) << "finished a sequence that is not live: " << f.id;
      ASSERT_TRUE(expected.count(f.id)) << "seq " << f.id << " finished early";
      EXPECT_EQ(f.reason, expected[f.id].first) << "seq " << f.id;
      EXPECT_EQ(f.stop_token, expected[f.id].second) << "seq " << f.id;
      EXPECT_EQ(f.num_generated_tokens, it->second.generated) << "seq " << f.id;
      EXPECT_LE(f.num_generated_tokens, it->second.params.max_tokens) << "seq " << f.id;
      EXPECT_LE(f.num_cached_tokens, it->second.prompt_len) << "seq " << f.id;
      live_.erase(it);
      ++ended_[f.id];
    }
  }

  // The step against the scheduled sequences' own state (num_computed_tokens counts the step's
  // tokens), plus a simulated KV cache: every new token is written at its slot, and each
  // sequence's whole context must read back as its token ids, prefix hits and recomputed blocks
  // included. A decode of a token the previous, pending step samples reads it from that step's
  // tokens, as the runner does on the device.
  void check_output(const ScheduleOutput& out) {
    const SchedulerConfig& c = workload_.config;
    const int32_t bs = c.block_size;
    EXPECT_LE(out.num_tokens, c.max_num_batched_tokens);
    EXPECT_LE(out.num_seqs, c.max_num_seqs);
    const int32_t* positions = out.field(ScheduleOutput::kPositions);
    const int32_t* input_ids = out.field(ScheduleOutput::kInputIds);
    const int32_t* slots = out.field(ScheduleOutput::kSlotMapping);
    const int32_t* cu = out.field(ScheduleOutput::kCuSeqlensQ);
    const int32_t* placeholder_rows = out.field(ScheduleOutput::kPlaceholderRows);
    const int32_t* placeholder_sources = out.field(ScheduleOutput::kPlaceholderSources);
    if (out.num_placeholders > 0) {
      ASSERT_FALSE(inflight_.empty()) << "a placeholder input with no step pending";
    }
    std::map<SeqId, TokenId> pending_token;  // seq -> its token that the pending step samples
    if (!inflight_.empty()) {
      const InFlight& previous = inflight_.back();
      for (size_t k = 0; k < previous.sampled_ids.size(); ++k) {
        pending_token[previous.sampled_ids[k]] = previous.tokens[k];
      }
    }
    std::map<int32_t, TokenId> from_device;  // input row -> what the runner writes there
    for (int32_t j = 0; j < out.num_placeholders; ++j) {
      ASSERT_LT(placeholder_sources[j], static_cast<int32_t>(inflight_.back().tokens.size()));
      from_device[placeholder_rows[j]] = inflight_.back().tokens[placeholder_sources[j]];
    }
    std::set<int32_t> seen_slots;
    for (int32_t i = 0; i < out.num_seqs; ++i) {
      const Sequence* seq = s_.find(out.seq_ids[i]);
      ASSERT_NE(seq, nullptr);
      ASSERT_TRUE(live_.count(seq->id));
      for (int32_t t = cu[i]; t < cu[i + 1]; ++t) {
        const int32_t pos = positions[t];
        ASSERT_LT(pos, seq->size());
        EXPECT_TRUE(seen_slots.insert(slots[t]).second) << "slot " << slots[t] << " written twice";
        const BlockId block = slots[t] / bs;
        EXPECT_TRUE(std::count(seq->block_table.begin(), seq->block_table.end(), block)) << "slot outside the table";
        ASSERT_LT(pos / bs, static_cast<int32_t>(seq->block_table.size()));
        EXPECT_EQ(slots[t], seq->block_table[pos / bs] * bs + pos % bs);
        if (seq->token_ids[pos] == kPlaceholderToken) {
          ASSERT_TRUE(from_device.count(t)) << "seq " << seq->id << " reads an unknown token at " << pos;
          ASSERT_EQ(from_device[t], pending_token.at(seq->id));
          kv_.at(slots[t]) = from_device[t];
        } else {
          EXPECT_FALSE(from_device.count(t)) << "a known token read from the device";
          EXPECT_EQ(input_ids[t], seq->token_ids[pos]);
          kv_.at(slots[t]) = input_ids[t];
        }
      }
    }
    // Read back as the attention kernel does: through the step's block table rows and context lengths.
    const int32_t* context_lens = out.field(ScheduleOutput::kContextLens);
    const int32_t* tables = out.field(ScheduleOutput::kBlockTables);
    for (int32_t i = 0; i < out.num_seqs; ++i) {
      const Sequence* seq = s_.find(out.seq_ids[i]);
      ASSERT_EQ(context_lens[i], positions[cu[i + 1] - 1] + 1);
      const int32_t* row = tables + static_cast<int64_t>(i) * out.block_table_width;
      for (int32_t pos = 0; pos < context_lens[i]; ++pos) {
        ASSERT_LT(pos / bs, out.block_table_width);
        const int32_t slot = row[pos / bs] * bs + pos % bs;
        const TokenId want = seq->token_ids[pos] == kPlaceholderToken ? pending_token.at(seq->id) : seq->token_ids[pos];
        ASSERT_EQ(kv_.at(slot), want) << "seq " << seq->id << " reads a wrong KV entry at " << pos;
      }
    }
  }

  void check_invariants() {
    if (::testing::Test::HasFailure()) return;
    const BlockAllocator& a = s_.allocator();
    const int32_t n = workload_.config.num_blocks, bs = workload_.config.block_size;
    std::vector<int32_t> owners(n, 0);
    int32_t running = 0, waiting = 0;
    for (const auto& [id, t] : live_) {
      const Sequence* seq = s_.find(id);
      ASSERT_NE(seq, nullptr) << "live seq " << id << " unknown to the scheduler";
      const std::set<BlockId> distinct(seq->block_table.begin(), seq->block_table.end());
      EXPECT_EQ(distinct.size(), seq->block_table.size()) << "seq " << id << " holds a block twice";
      for (BlockId b : seq->block_table) {
        ASSERT_TRUE(b >= 0 && b < n) << "block " << b;
        ++owners[b];
      }
      EXPECT_EQ(seq->num_generated_tokens(), t.generated) << "seq " << id;
      EXPECT_LE(t.generated, t.params.max_tokens) << "seq " << id;
      if (t.generated > 0) {
        EXPECT_EQ(seq->token_ids[seq->num_known_tokens() - 1], t.last) << "seq " << id;
      }
      EXPECT_LE(seq->num_placeholders, static_cast<int32_t>(inflight_.size())) << "seq " << id;
      if (seq->status == SequenceStatus::kRunning) {
        ++running;
        const size_t computed_blocks = (seq->num_computed_tokens + bs - 1) / bs;
        EXPECT_GE(seq->block_table.size(), computed_blocks) << "seq " << id;
        EXPECT_LE(seq->block_table.size(), static_cast<size_t>((seq->size() + bs - 1) / bs)) << "seq " << id;
        EXPECT_LT(seq->num_computed_tokens, seq->size()) << "seq " << id;
      } else {
        ASSERT_EQ(seq->status, SequenceStatus::kWaiting) << "seq " << id;
        ++waiting;
        EXPECT_TRUE(seq->block_table.empty()) << "seq " << id;
        EXPECT_EQ(seq->num_computed_tokens, 0) << "seq " << id;
      }
    }
    // Every sequence the scheduler holds is one this test tracks.
    EXPECT_EQ(running, s_.num_running());
    EXPECT_EQ(waiting, s_.num_waiting());
    EXPECT_LE(running, workload_.config.max_num_seqs);
    int32_t used = 0;
    for (BlockId b = 0; b < n; ++b) {
      EXPECT_EQ(a.ref_count(b), owners[b]) << "block " << b;
      used += a.ref_count(b) > 0;
    }
    EXPECT_EQ(a.num_free_blocks() + a.num_used_blocks(), n);
    EXPECT_EQ(a.num_used_blocks(), used);
    EXPECT_EQ(a.stats().num_used_blocks, used);
  }

  // A step scheduled and not yet postprocessed: its sampled sequences and the tokens drawn for them.
  struct InFlight {
    std::vector<SeqId> sampled_ids;
    std::vector<TokenId> tokens;
  };

  const Workload workload_;
  const bool overlapped_;
  Scheduler s_;
  std::mt19937 rng_;
  std::vector<TokenId> kv_;  // token id held by each KV slot
  std::vector<std::vector<TokenId>> prefixes_;
  std::map<SeqId, Tracked> live_;
  std::map<SeqId, int> ended_;  // how many times each sequence finished or was aborted
  std::deque<InFlight> inflight_;
  int num_added_ = 0, num_rejected_ = 0, num_steps_ = 0;
};

const std::vector<Workload>& workloads() {
  static const std::vector<Workload> all = {
      {"bs8_small_pool",
       {.num_blocks = 10, .block_size = 8, .max_num_seqs = 6, .max_num_batched_tokens = 24, .max_model_len = 96},
       28, 12, 24, true},
      {"bs8_small_pool_constant_hash",
       {.num_blocks = 10, .block_size = 8, .max_num_seqs = 6, .max_num_batched_tokens = 24, .max_model_len = 96},
       28, 12, 24, true, constant_hash},
      {"bs8_tiny_budget_no_cache",
       {.num_blocks = 16, .block_size = 8, .max_num_seqs = 64, .max_num_batched_tokens = 3, .max_model_len = 48,
        .enable_prefix_caching = false},
       28, 12, 16, false},
      {"bs16_pool_pressure",
       {.num_blocks = 8, .block_size = 16, .max_num_seqs = 8, .max_num_batched_tokens = 40, .max_model_len = 160},
       56, 24, 40, true},
      {"bs16_large",
       {.num_blocks = 128, .block_size = 16, .max_num_seqs = 256, .max_num_batched_tokens = 4096, .max_model_len = 512},
       56, 24, 40, false},
      {"bs256_small_pool",
       {.num_blocks = 6, .block_size = 256, .max_num_seqs = 3, .max_num_batched_tokens = 300, .max_model_len = 2048},
       600, 300, 40, true},
  };
  return all;
}

}  // namespace

TEST(SchedulerProperty, RandomOperationsKeepInvariants) {
  for (bool overlapped : {false, true}) {
    int total_steps = 0;
    for (const Workload& workload : workloads()) {
      for (uint32_t seed : {1u, 2u, 3u, 4u, 5u}) {
        SCOPED_TRACE(workload.name + " seed " + std::to_string(seed) + (overlapped ? " overlapped" : ""));
        PropertyRun run(workload, seed, overlapped);
        run.run(3000);
        run.drain();
        total_steps += run.num_steps();
        if (HasFailure()) return;
      }
    }
    EXPECT_GT(total_steps, 25000);
  }
}
