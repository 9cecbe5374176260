// Scheduler: batch layout, chunked prefill, prefix hits, preemption, aborts, finishing rules, errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <numeric>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "pnl/core/hash.h"
#include "pnl/core/scheduler.h"

using namespace pnl::core;

namespace {

using Ids = std::vector<int32_t>;
using SeqIds = std::vector<SeqId>;

std::vector<TokenId> iota_tokens(int32_t n, TokenId first) {
  std::vector<TokenId> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

std::vector<TokenId> concat(std::vector<TokenId> a, const std::vector<TokenId>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::vector<TokenId> head(const std::vector<TokenId>& t, int32_t n) { return {t.begin(), t.begin() + n}; }

// Puts every block in one hash bucket: only the allocator's token and parent checks keep chains apart.
uint64_t constant_hash(uint64_t, const TokenId*, int32_t) { return 42; }

StopParams max_tokens(int32_t n) {
  StopParams p;
  p.max_tokens = n;
  return p;
}

// The fake model: the next token is a function of the whole history (FNV-1a, unrelated to the
// engine's block hash), so a token sampled from a wrong or incomplete context shows up as a mismatch.
TokenId next_token(const TokenId* tokens, size_t n) {
  uint64_t h = 14695981039346656037ULL;
  for (size_t i = 0; i < n; ++i) {
    h ^= static_cast<uint32_t>(tokens[i]);
    h *= 1099511628211ULL;
  }
  return static_cast<TokenId>(h % 1000);
}

// What an ideal engine generates: the model applied to the growing history, n times.
std::vector<TokenId> reference_generation(std::vector<TokenId> history, int32_t n) {
  std::vector<TokenId> out;
  for (int32_t i = 0; i < n; ++i) {
    out.push_back(next_token(history.data(), history.size()));
    history.push_back(out.back());
  }
  return out;
}

// A copy of one step's output; the scheduler overwrites its own at a later schedule().
struct Step {
  int32_t num_tokens = 0, num_seqs = 0, num_sampled = 0, num_decode_seqs = 0, width = 0;
  int32_t max_seqlen_q = 0, max_context_len = 0;
  Ids input_ids, positions, slot_mapping, cu_seqlens_q, context_lens, sample_indices, block_tables;
  Ids placeholder_rows, placeholder_sources;
  SeqIds seq_ids, sampled_seq_ids, preempted_seq_ids;

  Ids row(int32_t s) const {
    return Ids(block_tables.begin() + s * width, block_tables.begin() + (s + 1) * width);
  }
};

Ids field(const ScheduleOutput& out, ScheduleOutput::Field f) {
  return Ids(out.field(f), out.field(f) + out.field_size(f));
}

Step copy_step(const ScheduleOutput& out) {
  Step st;
  st.num_tokens = out.num_tokens;
  st.num_seqs = out.num_seqs;
  st.num_sampled = out.num_sampled;
  st.num_decode_seqs = out.num_decode_seqs;
  st.width = out.block_table_width;
  st.max_seqlen_q = out.max_seqlen_q;
  st.max_context_len = out.max_context_len;
  st.input_ids = field(out, ScheduleOutput::kInputIds);
  st.positions = field(out, ScheduleOutput::kPositions);
  st.slot_mapping = field(out, ScheduleOutput::kSlotMapping);
  st.cu_seqlens_q = field(out, ScheduleOutput::kCuSeqlensQ);
  st.context_lens = field(out, ScheduleOutput::kContextLens);
  st.sample_indices = field(out, ScheduleOutput::kSampleIndices);
  st.block_tables = field(out, ScheduleOutput::kBlockTables);
  st.placeholder_rows = field(out, ScheduleOutput::kPlaceholderRows);
  st.placeholder_sources = field(out, ScheduleOutput::kPlaceholderSources);
  st.seq_ids = out.seq_ids;
  st.sampled_seq_ids = out.sampled_seq_ids;
  st.preempted_seq_ids = out.preempted_seq_ids;
  return st;
}

// What every step must satisfy, checked against each scheduled sequence's own state just after
// schedule(): num_computed_tokens counts the step's tokens, and a sampled sequence ends with the
// placeholder of the token the step draws. With another step pending, a step may be empty, and a
// decode may read the placeholder of a token that step samples.
void check_step(const ScheduleOutput& out, const Scheduler& s, bool another_pending = false) {
  const SchedulerConfig& c = s.config();
  const int32_t bs = c.block_size;
  const Step st = copy_step(out);
  if (!another_pending) {
    ASSERT_GE(st.num_seqs, 1) << "empty step with unfinished sequences";
  }
  EXPECT_LE(st.num_tokens, c.max_num_batched_tokens);
  EXPECT_LE(st.num_seqs, c.max_num_seqs);
  ASSERT_EQ(st.input_ids.size(), size_t(st.num_tokens));
  ASSERT_EQ(st.positions.size(), size_t(st.num_tokens));
  ASSERT_EQ(st.slot_mapping.size(), size_t(st.num_tokens));
  ASSERT_EQ(st.cu_seqlens_q.size(), size_t(st.num_seqs) + 1);
  ASSERT_EQ(st.context_lens.size(), size_t(st.num_seqs));
  ASSERT_EQ(st.sample_indices.size(), size_t(st.num_sampled));
  ASSERT_EQ(st.block_tables.size(), size_t(st.num_seqs) * st.width);
  ASSERT_EQ(st.seq_ids.size(), size_t(st.num_seqs));
  ASSERT_EQ(st.sampled_seq_ids.size(), size_t(st.num_sampled));
  ASSERT_EQ(st.placeholder_rows.size(), size_t(out.num_placeholders));
  ASSERT_EQ(st.placeholder_sources.size(), size_t(out.num_placeholders));
  if (!another_pending) {
    EXPECT_EQ(out.num_placeholders, 0);
  }
  EXPECT_EQ(st.cu_seqlens_q[0], 0);
  EXPECT_EQ(st.cu_seqlens_q[st.num_seqs], st.num_tokens);

  int32_t k = 0, p = 0, leading_decodes = 0, width = 0, max_q = 0, max_ctx = 0;
  bool leading = true;
  for (int32_t i = 0; i < st.num_seqs; ++i) {
    const Sequence* seq = s.find(st.seq_ids[i]);
    ASSERT_NE(seq, nullptr);
    const int32_t n = st.cu_seqlens_q[i + 1] - st.cu_seqlens_q[i];
    ASSERT_GE(n, 1);
    leading = leading && n == 1;
    leading_decodes += leading;
    width = std::max(width, static_cast<int32_t>(seq->block_table.size()));
    max_q = std::max(max_q, n);
    max_ctx = std::max(max_ctx, st.context_lens[i]);
    EXPECT_EQ(st.context_lens[i], seq->num_computed_tokens);
    const bool sampled = seq->token_ids.back() == kPlaceholderToken && st.context_lens[i] == seq->size() - 1;
    ASSERT_LE(st.context_lens[i], seq->size() - sampled);
    for (int32_t j = 0; j < n; ++j) {
      const int32_t t = st.cu_seqlens_q[i] + j, pos = seq->num_computed_tokens - n + j;
      EXPECT_EQ(st.positions[t], pos);
      if (seq->token_ids[pos] == kPlaceholderToken) {  // drawn by the pending step
        ASSERT_LT(p, out.num_placeholders);
        EXPECT_EQ(st.placeholder_rows[p++], t);
        EXPECT_EQ(st.input_ids[t], 0);
      } else {
        EXPECT_EQ(st.input_ids[t], seq->token_ids[pos]);
      }
      EXPECT_EQ(st.slot_mapping[t], seq->block_table.at(pos / bs) * bs + pos % bs);
    }
    const Ids row = st.row(i);
    for (int32_t w = 0; w < st.width; ++w) {
      EXPECT_EQ(row[w], w < static_cast<int32_t>(seq->block_table.size()) ? seq->block_table[w] : -1);
    }
    if (sampled) {  // the chunk reaches the last token
      ASSERT_LT(k, st.num_sampled);
      EXPECT_EQ(st.sample_indices[k], st.cu_seqlens_q[i + 1] - 1);
      EXPECT_EQ(st.sampled_seq_ids[k], seq->id);
      ++k;
    }
  }
  EXPECT_EQ(k, st.num_sampled);
  EXPECT_EQ(p, out.num_placeholders);
  EXPECT_EQ(st.num_decode_seqs, leading_decodes);
  EXPECT_EQ(st.width, width);
  EXPECT_EQ(st.max_seqlen_q, max_q);
  EXPECT_EQ(st.max_context_len, max_ctx);
}

// Runs a Scheduler like the engine loop does, with a fake model that keeps a simulated KV cache: each
// new token's id is written at its slot, and each sampled sequence's context is read back through its
// block table. A wrong slot, block table or shared prefix block changes what the model sees, and so
// the tokens it generates, which tests compare with reference_generation().
class Driver {
 public:
  explicit Driver(const SchedulerConfig& c, BlockHasher hasher = hash_block)
      : s(c, hasher), kv_(static_cast<size_t>(c.num_blocks) * c.block_size, -1) {}

  SeqId add(const std::vector<TokenId>& prompt, const StopParams& params) {
    const SeqId id = s.add(prompt, params);
    prompts[id] = prompt;
    return id;
  }

  bool abort(SeqId id) {
    const bool ok = s.abort(id);
    if (ok) aborted.insert(id);
    return ok;
  }

  // schedule(), checked; the model runs at once, as the runner would, with the inputs that the
  // previous step samples filled in from its tokens, and its own tokens wait for postprocess().
  // The reference is valid until the next schedule().
  const Step& schedule() {
    const bool another_pending = s.step_pending();
    const ScheduleOutput& out = s.schedule();
    check_step(out, s, another_pending);
    steps.push_back(copy_step(out));
    Step& st = steps.back();
    for (size_t j = 0; j < st.placeholder_rows.size(); ++j) {
      st.input_ids[st.placeholder_rows[j]] = inflight_.back().tokens.at(st.placeholder_sources[j]);
    }
    const int32_t bs = s.config().block_size;
    for (int32_t t = 0; t < st.num_tokens; ++t) kv_.at(st.slot_mapping[t]) = st.input_ids[t];
    InFlight next{steps.size() - 1, {}};
    for (int32_t k = 0; k < st.num_sampled; ++k) {
      const int32_t i = static_cast<int32_t>(
          std::find(st.seq_ids.begin(), st.seq_ids.end(), st.sampled_seq_ids[k]) - st.seq_ids.begin());
      const Ids row = st.row(i);
      std::vector<TokenId> context;
      for (int32_t pos = 0; pos < st.context_lens[i]; ++pos) {
        context.push_back(kv_.at(row.at(pos / bs) * bs + pos % bs));
      }
      next.tokens.push_back(next_token(context.data(), context.size()));
    }
    inflight_.push_back(std::move(next));
    return st;
  }

  // postprocess() of the oldest pending step, with the model's tokens or with `tokens` instead. A
  // sequence that ended while the step was pending gets no token.
  std::vector<FinishedSequence> postprocess(const std::optional<std::vector<TokenId>>& tokens = std::nullopt) {
    const InFlight oldest = inflight_.front();
    inflight_.pop_front();
    const std::vector<TokenId>& sampled = tokens ? *tokens : oldest.tokens;
    std::vector<FinishedSequence> fin = s.postprocess(sampled.data(), static_cast<int64_t>(sampled.size()));
    const Step& st = steps[oldest.step];
    for (size_t k = 0; k < st.sampled_seq_ids.size(); ++k) {
      const SeqId id = st.sampled_seq_ids[k];
      if (!aborted.count(id) && !finished.count(id)) generated[id].push_back(sampled[k]);
    }
    for (const FinishedSequence& f : fin) EXPECT_TRUE(finished.emplace(f.id, f).second) << "finished twice: " << f.id;
    return fin;
  }

  const Step& step() {
    schedule();
    postprocess();
    return steps.back();
  }

  // Steps until nothing is left, each scheduled while the one before is pending (overlapped);
  // then every block must be free.
  void drain_overlapped(size_t max_steps = 5000) {
    for (size_t n = 0; s.has_unfinished() || !inflight_.empty(); ++n) {
      ASSERT_LT(n, max_steps) << "scheduler does not finish";
      if (s.has_unfinished()) schedule();
      if (inflight_.size() == 2 || !s.has_unfinished()) postprocess();
    }
    EXPECT_EQ(s.allocator().num_used_blocks(), 0);
    EXPECT_EQ(s.allocator().num_free_blocks(), s.config().num_blocks);
  }

  // Steps until nothing is left; then every block must be free.
  void drain(size_t max_steps = 5000) {
    for (size_t n = 0; s.has_unfinished(); ++n) {
      ASSERT_LT(n, max_steps) << "scheduler does not finish";
      step();
    }
    EXPECT_EQ(s.allocator().num_used_blocks(), 0);
    EXPECT_EQ(s.allocator().num_free_blocks(), s.config().num_blocks);
  }

  std::vector<TokenId> expected(SeqId id, int32_t n) const { return reference_generation(prompts.at(id), n); }

  // The first step (index >= from) that schedules `id`, or steps.size().
  size_t first_step_with(SeqId id, size_t from = 0) const {
    for (size_t i = from; i < steps.size(); ++i) {
      if (std::count(steps[i].seq_ids.begin(), steps[i].seq_ids.end(), id)) return i;
    }
    return steps.size();
  }

  Scheduler s;
  std::vector<Step> steps;
  std::map<SeqId, std::vector<TokenId>> prompts, generated;
  std::map<SeqId, FinishedSequence> finished;
  std::set<SeqId> aborted;

 private:
  struct InFlight {
    size_t step;                  // index in steps
    std::vector<TokenId> tokens;  // what the model sampled
  };
  std::vector<TokenId> kv_;  // token id held by each KV slot
  std::deque<InFlight> inflight_;
};

}  // namespace

TEST(Scheduler, ScheduleOutputContents) {
  Driver d({.num_blocks = 16, .block_size = 8, .max_num_batched_tokens = 64});
  const SeqId a = d.add(iota_tokens(10, 100), max_tokens(4));
  const SeqId b = d.add(iota_tokens(3, 200), max_tokens(4));
  const Step st = d.schedule();
  EXPECT_EQ(st.num_tokens, 13);
  EXPECT_EQ(st.num_seqs, 2);
  EXPECT_EQ(st.num_sampled, 2);
  EXPECT_EQ(st.num_decode_seqs, 0);
  EXPECT_EQ(st.width, 2);
  EXPECT_EQ(st.max_seqlen_q, 10);
  EXPECT_EQ(st.max_context_len, 10);
  EXPECT_EQ(st.seq_ids, (SeqIds{a, b}));
  EXPECT_EQ(st.sampled_seq_ids, (SeqIds{a, b}));
  EXPECT_TRUE(st.preempted_seq_ids.empty());
  EXPECT_EQ(st.input_ids, concat(iota_tokens(10, 100), iota_tokens(3, 200)));
  EXPECT_EQ(st.positions, concat(iota_tokens(10, 0), iota_tokens(3, 0)));
  EXPECT_EQ(st.cu_seqlens_q, (Ids{0, 10, 13}));
  EXPECT_EQ(st.context_lens, (Ids{10, 3}));
  EXPECT_EQ(st.sample_indices, (Ids{9, 12}));
  // a spans two blocks, b one; the row of b is padded with -1. Three distinct blocks of the pool.
  const Ids ra = st.row(0), rb = st.row(1);
  EXPECT_EQ(rb[1], -1);
  const std::set<int32_t> blocks{ra[0], ra[1], rb[0]};
  EXPECT_EQ(blocks.size(), 3u);
  EXPECT_GE(*blocks.begin(), 0);
  EXPECT_LT(*blocks.rbegin(), 16);
  EXPECT_EQ(d.s.allocator().num_used_blocks(), 3);
  Ids slots;
  for (int32_t pos = 0; pos < 10; ++pos) slots.push_back(ra[pos / 8] * 8 + pos % 8);
  for (int32_t pos = 0; pos < 3; ++pos) slots.push_back(rb[0] * 8 + pos);
  EXPECT_EQ(st.slot_mapping, slots);

  d.postprocess(std::vector<TokenId>{7, 8});
  EXPECT_EQ(d.s.find(a)->token_ids.back(), 7);
  EXPECT_EQ(d.s.find(b)->token_ids.back(), 8);
  EXPECT_EQ(d.s.find(a)->num_computed_tokens, 10);

  // Next step: two decodes, each the token sampled last step at the next position.
  const Step st2 = d.schedule();
  EXPECT_EQ(st2.num_tokens, 2);
  EXPECT_EQ(st2.num_decode_seqs, 2);
  EXPECT_EQ(st2.seq_ids, (SeqIds{a, b}));
  EXPECT_EQ(st2.input_ids, (Ids{7, 8}));
  EXPECT_EQ(st2.positions, (Ids{10, 3}));
  EXPECT_EQ(st2.slot_mapping, (Ids{ra[1] * 8 + 2, rb[0] * 8 + 3}));
  EXPECT_EQ(st2.cu_seqlens_q, (Ids{0, 1, 2}));
  EXPECT_EQ(st2.context_lens, (Ids{11, 4}));
  EXPECT_EQ(st2.sample_indices, (Ids{0, 1}));
  EXPECT_EQ(st2.sampled_seq_ids, (SeqIds{a, b}));
  EXPECT_EQ(st2.row(0), ra);
  EXPECT_EQ(st2.row(1), rb);
  EXPECT_EQ(st2.max_seqlen_q, 1);
  EXPECT_EQ(st2.max_context_len, 11);
}

TEST(Scheduler, LongPromptIsChunkedWithinTokenBudget) {
  Driver d({.num_blocks = 16, .block_size = 8, .max_num_batched_tokens = 16});
  const SeqId a = d.add(iota_tokens(40, 100), max_tokens(3));
  d.drain();
  // 16 + 16 + 8 prompt tokens, then two decodes. Only the chunk that reaches the last token samples.
  ASSERT_EQ(d.steps.size(), 5u);
  const Ids num_tokens{16, 16, 8, 1, 1}, first_pos{0, 16, 32, 40, 41}, num_sampled{0, 0, 1, 1, 1};
  for (size_t i = 0; i < d.steps.size(); ++i) {
    EXPECT_EQ(d.steps[i].num_tokens, num_tokens[i]) << "step " << i;
    EXPECT_EQ(d.steps[i].positions.front(), first_pos[i]) << "step " << i;
    EXPECT_EQ(d.steps[i].num_sampled, num_sampled[i]) << "step " << i;
  }
  EXPECT_TRUE(d.steps[0].sampled_seq_ids.empty());
  EXPECT_EQ(d.steps[2].sample_indices, (Ids{7}));
  EXPECT_EQ(d.steps[2].sampled_seq_ids, (SeqIds{a}));
  EXPECT_EQ(d.generated[a], d.expected(a, 3));
  EXPECT_EQ(d.finished.at(a).reason, FinishReason::kLength);
}

TEST(Scheduler, MixedStepPutsDecodesBeforePrefillChunk) {
  Driver d({.num_blocks = 16, .block_size = 8, .max_num_batched_tokens = 16});
  const SeqId a = d.add(iota_tokens(4, 100), max_tokens(10));
  const SeqId b = d.add(iota_tokens(40, 300), max_tokens(2));
  // Step 1: all of a and a 12-token chunk of b. Steps 2-3: a's decode, then b's next chunk.
  const Step s1 = d.step();
  EXPECT_EQ(s1.seq_ids, (SeqIds{a, b}));
  EXPECT_EQ(s1.cu_seqlens_q, (Ids{0, 4, 16}));
  EXPECT_EQ(s1.context_lens, (Ids{4, 12}));
  EXPECT_EQ(s1.num_decode_seqs, 0);
  EXPECT_EQ(s1.sampled_seq_ids, (SeqIds{a}));
  EXPECT_EQ(s1.sample_indices, (Ids{3}));

  const Step s2 = d.step();
  EXPECT_EQ(s2.seq_ids, (SeqIds{a, b}));
  EXPECT_EQ(s2.num_decode_seqs, 1);
  EXPECT_EQ(s2.cu_seqlens_q, (Ids{0, 1, 16}));
  EXPECT_EQ(s2.positions[0], 4);
  EXPECT_EQ(s2.positions[1], 12);
  EXPECT_EQ(s2.context_lens, (Ids{5, 27}));
  EXPECT_EQ(s2.sampled_seq_ids, (SeqIds{a}));
  EXPECT_EQ(s2.sample_indices, (Ids{0}));

  const Step s3 = d.step();
  EXPECT_EQ(s3.num_decode_seqs, 1);
  EXPECT_EQ(s3.cu_seqlens_q, (Ids{0, 1, 14}));
  EXPECT_EQ(s3.context_lens, (Ids{6, 40}));
  EXPECT_EQ(s3.sampled_seq_ids, (SeqIds{a, b}));
  EXPECT_EQ(s3.sample_indices, (Ids{0, 13}));

  const Step s4 = d.step();
  EXPECT_EQ(s4.num_decode_seqs, 2);
  EXPECT_EQ(s4.context_lens, (Ids{7, 41}));
  d.drain();
  EXPECT_EQ(d.generated[a], d.expected(a, 10));
  EXPECT_EQ(d.generated[b], d.expected(b, 2));
}

TEST(Scheduler, MaxNumSeqsLimitsRunningSequences) {
  Driver d({.num_blocks = 16, .block_size = 8, .max_num_seqs = 2});
  SeqIds ids;
  for (int i = 0; i < 4; ++i) ids.push_back(d.add(iota_tokens(3, 100 * i), max_tokens(2)));
  EXPECT_EQ(d.step().seq_ids, (SeqIds{ids[0], ids[1]}));
  EXPECT_EQ(d.s.num_running(), 2);
  EXPECT_EQ(d.s.num_waiting(), 2);
  EXPECT_EQ(d.step().seq_ids, (SeqIds{ids[0], ids[1]}));  // both finish here
  EXPECT_EQ(d.step().seq_ids, (SeqIds{ids[2], ids[3]}));
  d.drain();
  EXPECT_EQ(d.steps.size(), 4u);
  for (SeqId id : ids) EXPECT_EQ(d.generated[id], d.expected(id, 2));
}

TEST(Scheduler, PrefixCacheHitSkipsCachedTokens) {
  Driver d({.num_blocks = 32, .block_size = 8});
  const std::vector<TokenId> prefix = iota_tokens(28, 500);  // three full blocks and 4 tokens
  const SeqId first = d.add(prefix, max_tokens(1));
  d.drain();
  EXPECT_EQ(d.finished.at(first).num_cached_tokens, 0);
  const Ids cached_row = d.steps[0].row(0);

  struct Case {
    int32_t shared;  // leading tokens of `prefix`
    std::vector<TokenId> tail;
    int32_t hit;     // expected num_cached_tokens
  };
  const std::vector<Case> cases = {
      {24, iota_tokens(6, 900), 24},  // all three full blocks, then diverges
      {24, {}, 16},                   // the whole prompt is cached: its last block is still computed
      {25, {}, 24},                   // ... here only its last token is
      {12, iota_tokens(9, 900), 8},   // diverges inside the second block
      {5, iota_tokens(12, 900), 0},   // diverges inside the first block
  };
  int64_t queries = 28, hits = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE("shared " + std::to_string(c.shared));
    const std::vector<TokenId> prompt = concat(head(prefix, c.shared), c.tail);
    const SeqId id = d.add(prompt, max_tokens(2));
    const Step st = d.schedule();
    EXPECT_EQ(d.s.find(id)->num_cached_tokens, c.hit);
    EXPECT_EQ(st.positions.front(), c.hit);
    EXPECT_EQ(st.num_tokens, static_cast<int32_t>(prompt.size()) - c.hit);
    if (c.hit > 0) {
      EXPECT_EQ(st.row(0)[0], cached_row[0]);
    }
    d.postprocess();
    d.drain();
    EXPECT_EQ(d.finished.at(id).num_cached_tokens, c.hit);
    EXPECT_EQ(d.generated[id], d.expected(id, 2));
    queries += static_cast<int64_t>(prompt.size());
    hits += c.hit;
  }
  EXPECT_EQ(d.s.allocator().stats().prefix_queries, queries);
  EXPECT_EQ(d.s.allocator().stats().prefix_hits, hits);
}

TEST(Scheduler, RunningSequencesShareCachedPrefixBlocks) {
  Driver d({.num_blocks = 16, .block_size = 8});
  const std::vector<TokenId> prefix = iota_tokens(20, 500);
  const SeqId a = d.add(prefix, max_tokens(4));
  d.step();
  const SeqId b = d.add(concat(prefix, {7}), max_tokens(4));
  const Step st = d.step();
  EXPECT_EQ(st.seq_ids, (SeqIds{a, b}));
  EXPECT_EQ(st.positions[1], 16);  // b starts after the two full blocks it shares with a
  const std::vector<BlockId>& ta = d.s.find(a)->block_table;
  const std::vector<BlockId>& tb = d.s.find(b)->block_table;
  ASSERT_EQ(ta.size(), 3u);
  ASSERT_EQ(tb.size(), 3u);
  EXPECT_EQ(tb[0], ta[0]);
  EXPECT_EQ(tb[1], ta[1]);
  EXPECT_NE(tb[2], ta[2]);  // a's partial third block is never shared
  EXPECT_EQ(d.s.allocator().ref_count(ta[0]), 2);
  EXPECT_EQ(d.s.allocator().ref_count(ta[1]), 2);
  EXPECT_EQ(d.s.allocator().ref_count(ta[2]), 1);
  EXPECT_EQ(d.s.allocator().num_used_blocks(), 4);
  d.drain();
  EXPECT_EQ(d.generated[a], d.expected(a, 4));
  EXPECT_EQ(d.generated[b], d.expected(b, 4));
}

TEST(Scheduler, PrefixCachingDisabledRecomputesEverything) {
  Driver d({.num_blocks = 32, .block_size = 8, .enable_prefix_caching = false});
  const std::vector<TokenId> prefix = iota_tokens(20, 500);
  d.add(prefix, max_tokens(1));
  d.drain();
  const SeqId id = d.add(prefix, max_tokens(2));
  EXPECT_EQ(d.schedule().positions.front(), 0);
  d.postprocess();
  d.drain();
  EXPECT_EQ(d.finished.at(id).num_cached_tokens, 0);
  EXPECT_EQ(d.generated[id], d.expected(id, 2));
  EXPECT_EQ(d.s.allocator().stats().prefix_hits, 0);
}

TEST(Scheduler, PreemptsNewestWhenBlocksRunOutAndResumes) {
  // Two sequences of 8 + 16 tokens need 3 blocks each at the end; the pool has 4.
  Driver d({.num_blocks = 4, .block_size = 8, .max_num_batched_tokens = 64});
  const SeqId a = d.add(iota_tokens(8, 10), max_tokens(16));
  const SeqId b = d.add(iota_tokens(8, 30), max_tokens(16));
  // Step 1 prefills both; steps 2-9 decode positions 8-15 in a second block each.
  for (int i = 0; i < 9; ++i) {
    const Step& st = d.step();
    EXPECT_EQ(st.seq_ids, (SeqIds{a, b})) << "step " << i;
    EXPECT_TRUE(st.preempted_seq_ids.empty()) << "step " << i;
  }
  EXPECT_EQ(d.s.allocator().num_free_blocks(), 0);

  // Position 16 needs a third block: the newest sequence, b, gives its blocks back.
  const Step st = d.schedule();
  EXPECT_EQ(st.preempted_seq_ids, (SeqIds{b}));
  EXPECT_EQ(st.seq_ids, (SeqIds{a}));
  EXPECT_EQ(d.s.num_preemptions(), 1);
  const Sequence* sb = d.s.find(b);
  ASSERT_NE(sb, nullptr);
  EXPECT_EQ(sb->status, SequenceStatus::kWaiting);
  EXPECT_EQ(sb->num_computed_tokens, 0);
  EXPECT_TRUE(sb->block_table.empty());
  EXPECT_EQ(sb->num_preemptions, 1);
  EXPECT_EQ(sb->size(), 8 + 9);  // keeps its generated tokens, to be recomputed
  d.postprocess();
  d.drain();

  // b resumes once a finishes (a's 16th token is sampled at step 16), its prompt block a prefix hit.
  const size_t resume = d.first_step_with(b, 10);
  EXPECT_EQ(resume, 16u);
  ASSERT_LT(resume, d.steps.size());
  EXPECT_EQ(d.steps[resume].seq_ids, (SeqIds{b}));
  EXPECT_EQ(d.steps[resume].positions.front(), 8);
  EXPECT_EQ(d.steps[resume].num_tokens, 9);
  EXPECT_EQ(d.s.num_preemptions(), 1);
  for (SeqId id : {a, b}) {
    EXPECT_EQ(d.generated[id], d.expected(id, 16)) << "seq " << id;
    EXPECT_EQ(d.finished.at(id).reason, FinishReason::kLength);
    EXPECT_EQ(d.finished.at(id).num_generated_tokens, 16);
    EXPECT_EQ(d.finished.at(id).num_cached_tokens, 0);  // counted at first admission only
  }
}

// The generated tokens depend only on the requests, never on how they were batched: with and without
// preemption, prefix caching (even with every block key colliding), chunking or concurrency they
// equal the reference generation.
TEST(Scheduler, GenerationIsIndependentOfScheduling) {
  const std::vector<TokenId> p = iota_tokens(20, 500);
  struct Request {
    std::vector<TokenId> prompt;
    int32_t max_tokens;
  };
  const std::vector<Request> requests = {
      {concat(p, {900, 901, 902}), 12},
      {p, 20},
      {iota_tokens(37, 700), 24},  // the largest: 37 + 24 - 1 tokens fit in 8 blocks of 8
      {concat(head(p, 16), iota_tokens(5, 950)), 9},
      {iota_tokens(3, 40), 30},
      {concat(p, {900, 901, 902}), 15},
      {iota_tokens(9, 60), 1},
  };
  struct Variant {
    std::string name;
    SchedulerConfig config;
    bool preempts;
    BlockHasher hasher = hash_block;
  };
  const std::vector<Variant> variants = {
      {"large", {.num_blocks = 64, .block_size = 8}, false},
      {"no_prefix_cache", {.num_blocks = 64, .block_size = 8, .enable_prefix_caching = false}, false},
      {"budget_5", {.num_blocks = 64, .block_size = 8, .max_num_batched_tokens = 5}, false},
      {"budget_1", {.num_blocks = 64, .block_size = 8, .max_num_batched_tokens = 1}, false},
      {"one_seq", {.num_blocks = 64, .block_size = 8, .max_num_seqs = 1}, false},
      {"tiny_pool", {.num_blocks = 8, .block_size = 8}, true},
      {"tiny_pool_budget_7_no_cache",
       {.num_blocks = 8, .block_size = 8, .max_num_batched_tokens = 7, .enable_prefix_caching = false}, true},
      {"bs16_tiny_pool", {.num_blocks = 4, .block_size = 16}, true},
      {"tiny_pool_constant_hash", {.num_blocks = 8, .block_size = 8}, true, constant_hash},
  };
  for (const Variant& variant : variants) {
    for (bool overlapped : {false, true}) {  // each step scheduled while the one before is pending
      SCOPED_TRACE(variant.name + (overlapped ? " overlapped" : ""));
      Driver d(variant.config, variant.hasher);
      SeqIds ids;
      for (const Request& r : requests) ids.push_back(d.add(r.prompt, max_tokens(r.max_tokens)));
      if (overlapped) {
        d.drain_overlapped();
      } else {
        d.drain();
      }
      EXPECT_EQ(d.s.num_preemptions() > 0, variant.preempts);
      for (size_t i = 0; i < ids.size(); ++i) {
        EXPECT_EQ(d.generated[ids[i]], reference_generation(requests[i].prompt, requests[i].max_tokens))
            << "request " << i;
        ASSERT_EQ(d.finished.count(ids[i]), 1u);
        EXPECT_EQ(d.finished.at(ids[i]).reason, FinishReason::kLength);
        EXPECT_EQ(d.finished.at(ids[i]).num_generated_tokens, requests[i].max_tokens);
      }
    }
  }
}

TEST(Scheduler, OverlappedStepDecodesThePendingStepsTokens) {
  Driver d({.num_blocks = 16, .block_size = 8});
  const SeqId a = d.add(iota_tokens(10, 100), max_tokens(4));
  const SeqId b = d.add(iota_tokens(3, 200), max_tokens(4));
  const Step st1 = d.schedule();
  ASSERT_EQ(st1.sampled_seq_ids, (SeqIds{a, b}));
  // Step 2 is planned while step 1 runs: its inputs are step 1's tokens, still on the device.
  const Step st2 = d.schedule();
  EXPECT_EQ(d.s.num_pending_steps(), 2);
  EXPECT_EQ(st2.seq_ids, (SeqIds{a, b}));
  EXPECT_EQ(st2.positions, (Ids{10, 3}));
  EXPECT_EQ(st2.placeholder_rows, (Ids{0, 1}));
  EXPECT_EQ(st2.placeholder_sources, (Ids{0, 1}));
  EXPECT_EQ(st2.input_ids, (Ids{d.expected(a, 1)[0], d.expected(b, 1)[0]}));  // as the runner fills them
  EXPECT_EQ(d.s.find(a)->num_placeholders, 2);
  EXPECT_EQ(d.s.find(a)->num_generated_tokens(), 0);
  d.postprocess();
  EXPECT_EQ(d.s.find(a)->num_placeholders, 1);
  EXPECT_EQ(d.s.find(a)->token_ids[10], d.expected(a, 1)[0]);
  EXPECT_EQ(d.s.find(a)->num_generated_tokens(), 1);
  d.postprocess();
  d.drain_overlapped();
  EXPECT_EQ(d.generated[a], d.expected(a, 4));
  EXPECT_EQ(d.generated[b], d.expected(b, 4));
}

TEST(Scheduler, OverlappedStepsSkipASequenceWhosePendingTokenIsItsLast) {
  Driver d({.num_blocks = 16, .block_size = 8, .max_model_len = 9});
  const SeqId a = d.add(iota_tokens(4, 100), max_tokens(1));
  const SeqId b = d.add(iota_tokens(8, 200), max_tokens(5));  // max_model_len ends it after 1 token
  const SeqId c = d.add(iota_tokens(4, 300), max_tokens(2));
  d.schedule();
  const Step st2 = d.schedule();
  EXPECT_EQ(st2.seq_ids, (SeqIds{c}));
  d.postprocess();
  EXPECT_EQ(d.finished.at(a).reason, FinishReason::kLength);
  EXPECT_EQ(d.finished.at(b).reason, FinishReason::kLength);
  const Step st3 = d.schedule();  // c's second token is its last: nothing left to plan
  EXPECT_EQ(st3.num_seqs, 0);
  d.postprocess();
  d.postprocess();
  EXPECT_FALSE(d.s.has_unfinished());
  EXPECT_EQ(d.s.allocator().num_used_blocks(), 0);
  EXPECT_EQ(d.generated[c], d.expected(c, 2));
}

TEST(Scheduler, AbortWithTwoStepsPending) {
  Driver d({.num_blocks = 16, .block_size = 8});
  const SeqId a = d.add(iota_tokens(4, 100), max_tokens(5));
  const SeqId b = d.add(iota_tokens(4, 200), max_tokens(5));
  d.schedule();
  d.schedule();
  EXPECT_TRUE(d.abort(a));
  EXPECT_EQ(d.s.find(a), nullptr);
  EXPECT_EQ(d.s.allocator().num_used_blocks(), 1);
  EXPECT_TRUE(d.postprocess().empty());
  EXPECT_TRUE(d.postprocess().empty());
  d.drain_overlapped();
  EXPECT_EQ(d.finished.count(a), 0u);
  EXPECT_TRUE(d.generated[a].empty());
  EXPECT_EQ(d.generated[b], d.expected(b, 5));
}

TEST(Scheduler, FinishFromOutsideReportsAndCachesLikePostprocess) {
  Driver d({.num_blocks = 16, .block_size = 8});
  const SeqId a = d.add(iota_tokens(16, 100), max_tokens(10));
  d.step();
  d.step();
  EXPECT_EQ(d.s.finish(12345, FinishReason::kStop), std::nullopt);
  const std::optional<FinishedSequence> f = d.s.finish(a, FinishReason::kStop);
  ASSERT_TRUE(f.has_value());
  EXPECT_EQ(f->id, a);
  EXPECT_EQ(f->reason, FinishReason::kStop);
  EXPECT_EQ(f->stop_token, -1);
  EXPECT_EQ(f->num_generated_tokens, 2);
  EXPECT_EQ(d.s.find(a), nullptr);
  EXPECT_EQ(d.s.finish(a, FinishReason::kStop), std::nullopt);
  EXPECT_FALSE(d.abort(a));
  EXPECT_EQ(d.s.allocator().num_used_blocks(), 0);
  // Its two full prompt blocks stay cached for the next request with that prefix.
  const SeqId b = d.add(iota_tokens(17, 100), max_tokens(1));
  d.drain();
  EXPECT_EQ(d.finished.at(b).num_cached_tokens, 16);
}

TEST(Scheduler, AbortWhileWaiting) {
  Driver d({.num_blocks = 16, .block_size = 8, .max_num_seqs = 1});
  const SeqId a = d.add(iota_tokens(5, 100), max_tokens(3));
  const SeqId b = d.add(iota_tokens(5, 200), max_tokens(3));
  d.step();
  EXPECT_EQ(d.s.num_waiting(), 1);
  EXPECT_TRUE(d.abort(b));
  EXPECT_EQ(d.s.num_waiting(), 0);
  EXPECT_EQ(d.s.find(b), nullptr);
  EXPECT_FALSE(d.abort(b));
  EXPECT_FALSE(d.abort(12345));
  d.drain();
  EXPECT_EQ(d.first_step_with(b), d.steps.size());
  EXPECT_EQ(d.finished.size(), 1u);
  EXPECT_EQ(d.generated[a], d.expected(a, 3));
}

TEST(Scheduler, AbortWhileRunningFreesBlocks) {
  Driver d({.num_blocks = 16, .block_size = 8});
  const SeqId a = d.add(iota_tokens(10, 100), max_tokens(5));
  const SeqId b = d.add(iota_tokens(10, 200), max_tokens(5));
  d.step();
  EXPECT_EQ(d.s.allocator().num_used_blocks(), 4);
  const std::vector<BlockId> a_blocks = d.s.find(a)->block_table;
  EXPECT_TRUE(d.abort(a));
  EXPECT_EQ(d.s.find(a), nullptr);
  EXPECT_EQ(d.s.num_running(), 1);
  EXPECT_EQ(d.s.allocator().num_used_blocks(), 2);
  for (BlockId blk : a_blocks) EXPECT_EQ(d.s.allocator().ref_count(blk), 0);
  d.drain();
  EXPECT_EQ(d.first_step_with(a, 1), d.steps.size());
  EXPECT_EQ(d.finished.count(a), 0u);  // aborts are not reported by postprocess()
  EXPECT_EQ(d.generated[b], d.expected(b, 5));
}

TEST(Scheduler, AbortBetweenScheduleAndPostprocessSkipsItsToken) {
  Driver d({.num_blocks = 16, .block_size = 8});
  const SeqId a = d.add(iota_tokens(10, 100), max_tokens(5));
  const SeqId b = d.add(iota_tokens(10, 200), max_tokens(5));
  d.step();
  const Step st = d.schedule();
  ASSERT_EQ(st.sampled_seq_ids, (SeqIds{a, b}));
  const std::vector<BlockId> a_blocks = d.s.find(a)->block_table;
  EXPECT_TRUE(d.abort(a));
  EXPECT_EQ(d.s.find(a), nullptr);
  EXPECT_FALSE(d.abort(a));
  EXPECT_TRUE(d.s.step_pending());
  // The runner still hands in a's token; b must get the second one.
  EXPECT_TRUE(d.postprocess(std::vector<TokenId>{3000, 4000}).empty());
  EXPECT_EQ(d.s.find(b)->token_ids.back(), 4000);
  EXPECT_EQ(d.s.find(b)->size(), 12);
  for (BlockId blk : a_blocks) EXPECT_EQ(d.s.allocator().ref_count(blk), 0);
  EXPECT_EQ(d.s.allocator().num_used_blocks(), static_cast<int32_t>(d.s.find(b)->block_table.size()));
  const Step next = d.schedule();
  EXPECT_EQ(next.seq_ids, (SeqIds{b}));
  EXPECT_EQ(next.input_ids, (Ids{4000}));
  d.postprocess();
  d.drain();
  EXPECT_EQ(d.finished.count(a), 0u);
  EXPECT_EQ(d.finished.at(b).num_generated_tokens, 5);
}

TEST(Scheduler, AbortOfUnsampledChunkBetweenScheduleAndPostprocess) {
  Driver d({.num_blocks = 16, .block_size = 8, .max_num_batched_tokens = 8});
  const SeqId a = d.add(iota_tokens(2, 100), max_tokens(4));
  const SeqId b = d.add(iota_tokens(30, 200), max_tokens(4));
  d.step();  // a's prompt and 6 tokens of b
  const Step st = d.schedule();
  ASSERT_EQ(st.seq_ids, (SeqIds{a, b}));
  ASSERT_EQ(st.sampled_seq_ids, (SeqIds{a}));  // b's chunk does not reach its last token
  EXPECT_TRUE(d.abort(b));
  EXPECT_TRUE(d.postprocess(std::vector<TokenId>{77}).empty());
  EXPECT_EQ(d.s.find(a)->token_ids.back(), 77);
  EXPECT_EQ(d.s.allocator().num_used_blocks(), 1);
  d.drain();
  EXPECT_EQ(d.first_step_with(b, 2), d.steps.size());
  EXPECT_EQ(d.finished.at(a).num_generated_tokens, 4);
}

TEST(Scheduler, AddRejectsRequestsThatCanNeverRun) {
  {
    Scheduler s({.num_blocks = 4, .block_size = 8, .max_model_len = 16});
    EXPECT_THROW(s.add({}, max_tokens(1)), InvalidArgument);
    EXPECT_THROW(s.add(iota_tokens(16, 0), max_tokens(1)), InvalidArgument);  // prompt + 1 > max_model_len
    EXPECT_THROW(s.add(iota_tokens(3, 0), max_tokens(0)), InvalidArgument);
    StopParams min_over_max = max_tokens(2);
    min_over_max.min_tokens = 3;
    EXPECT_THROW(s.add(iota_tokens(3, 0), min_over_max), InvalidArgument);
    StopParams negative_min = max_tokens(2);
    negative_min.min_tokens = -1;
    EXPECT_THROW(s.add(iota_tokens(3, 0), negative_min), InvalidArgument);
    EXPECT_THROW(s.add({5, -1, 6}, max_tokens(1)), InvalidArgument);
    EXPECT_EQ(s.num_waiting(), 0);
    EXPECT_NO_THROW(s.add(iota_tokens(15, 0), max_tokens(1)));
    // max_model_len caps the growth, so a huge max_tokens still fits: 15 cached tokens, 2 blocks.
    EXPECT_NO_THROW(s.add(iota_tokens(15, 0), max_tokens(1000)));
    EXPECT_EQ(s.num_waiting(), 2);
  }
  {
    // 4 blocks of 8 hold 32 tokens; the last sampled token is never cached.
    Scheduler s({.num_blocks = 4, .block_size = 8, .max_model_len = 1024});
    EXPECT_NO_THROW(s.add(iota_tokens(20, 0), max_tokens(13)));
    EXPECT_THROW(s.add(iota_tokens(20, 0), max_tokens(14)), InvalidArgument);
    EXPECT_THROW(s.add(iota_tokens(33, 0), max_tokens(1)), InvalidArgument);
    EXPECT_EQ(s.num_waiting(), 1);
  }
}

TEST(Scheduler, ProtocolErrors) {
  Scheduler s({.num_blocks = 16, .block_size = 8});
  EXPECT_THROW(s.postprocess(nullptr, 0), ProtocolError);
  const SeqId a = s.add(iota_tokens(4, 0), max_tokens(3));
  const SeqId b = s.add(iota_tokens(4, 50), max_tokens(3));
  ASSERT_EQ(s.schedule().num_sampled, 2);
  // A wrong token count, or a negative token, leaves the step pending for a correct retry.
  const std::vector<TokenId> one{5}, three{5, 6, 7}, negative{5, -1}, two{5, 6};
  EXPECT_THROW(s.postprocess(one.data(), 1), InvalidArgument);
  EXPECT_THROW(s.postprocess(three.data(), 3), InvalidArgument);
  EXPECT_THROW(s.postprocess(negative.data(), 2), InvalidArgument);
  EXPECT_TRUE(s.step_pending());
  EXPECT_EQ(s.find(a)->token_ids, (std::vector<TokenId>{0, 1, 2, 3, kPlaceholderToken}));
  EXPECT_TRUE(s.postprocess(two.data(), 2).empty());
  EXPECT_FALSE(s.step_pending());
  EXPECT_EQ(s.find(a)->token_ids, (std::vector<TokenId>{0, 1, 2, 3, 5}));
  EXPECT_EQ(s.find(b)->token_ids.back(), 6);
  EXPECT_EQ(s.find(a)->num_computed_tokens, 4);
  EXPECT_THROW(s.postprocess(two.data(), 2), ProtocolError);
  // At most two steps pending: one running, one planned.
  s.schedule();
  s.schedule();
  EXPECT_EQ(s.num_pending_steps(), 2);
  EXPECT_THROW(s.schedule(), ProtocolError);
}

namespace {

// Runs one 4-token prompt, feeding `script` as its sampled tokens, and returns how it finished.
FinishedSequence finish_with(const StopParams& params, const std::vector<TokenId>& script,
                             int32_t max_model_len = 1024) {
  Driver d({.num_blocks = 64, .block_size = 8, .max_model_len = max_model_len});
  const SeqId id = d.add(iota_tokens(4, 100), params);
  for (TokenId t : script) {
    d.schedule();
    const std::vector<FinishedSequence> fin = d.postprocess(std::vector<TokenId>{t});
    if (!fin.empty()) {
      EXPECT_EQ(fin.size(), 1u);
      EXPECT_EQ(fin[0].id, id);
      EXPECT_FALSE(d.s.has_unfinished());
      EXPECT_EQ(d.s.allocator().num_used_blocks(), 0);
      return fin[0];
    }
  }
  ADD_FAILURE() << "still running after the whole script";
  return {id, FinishReason::kNone, -1, -1, -1};
}

StopParams stop_params(int32_t max, int32_t min, bool ignore_eos, std::vector<TokenId> stop, std::vector<TokenId> eos) {
  StopParams p;
  p.max_tokens = max;
  p.min_tokens = min;
  p.ignore_eos = ignore_eos;
  p.stop_token_ids = std::move(stop);
  p.eos_token_ids = std::move(eos);
  return p;
}

void expect_finish(const FinishedSequence& f, FinishReason reason, TokenId stop_token, int32_t num_generated) {
  EXPECT_EQ(f.reason, reason);
  EXPECT_EQ(f.stop_token, stop_token);
  EXPECT_EQ(f.num_generated_tokens, num_generated);
  EXPECT_EQ(f.num_cached_tokens, 0);
}

}  // namespace

TEST(Scheduler, FinishOnEos) {
  expect_finish(finish_with(stop_params(10, 0, false, {9}, {2, 3}), {5, 3, 7}), FinishReason::kStop, -1, 2);
  expect_finish(finish_with(stop_params(10, 0, false, {}, {2, 3}), {2}), FinishReason::kStop, -1, 1);
}

TEST(Scheduler, FinishOnStopTokenReportsIt) {
  expect_finish(finish_with(stop_params(10, 0, false, {9, 11}, {2}), {5, 11, 7}), FinishReason::kStop, 11, 2);
}

TEST(Scheduler, IgnoreEosStillStopsOnStopTokens) {
  expect_finish(finish_with(stop_params(10, 0, true, {9}, {2}), {2, 2, 9, 5}), FinishReason::kStop, 9, 3);
  expect_finish(finish_with(stop_params(3, 0, true, {}, {2}), {2, 2, 2, 2}), FinishReason::kLength, -1, 3);
}

TEST(Scheduler, MinTokensDefersEosAndStopTokens) {
  expect_finish(finish_with(stop_params(10, 3, false, {9}, {2}), {2, 9, 2, 5}), FinishReason::kStop, -1, 3);
  expect_finish(finish_with(stop_params(10, 3, false, {9}, {2}), {9, 2, 9, 5}), FinishReason::kStop, 9, 3);
}

TEST(Scheduler, FinishOnMaxTokens) {
  expect_finish(finish_with(stop_params(4, 0, false, {9}, {2}), {5, 5, 5, 5, 5}), FinishReason::kLength, -1, 4);
  // A stop token sampled as the last allowed token still reports kStop.
  expect_finish(finish_with(stop_params(2, 0, false, {9}, {2}), {5, 2}), FinishReason::kStop, -1, 2);
}

TEST(Scheduler, FinishOnMaxModelLen) {
  // A 4-token prompt with max_model_len 7 ends after 3 tokens, well before max_tokens.
  expect_finish(finish_with(stop_params(100, 0, false, {}, {}), {5, 5, 5, 5}, 7), FinishReason::kLength, -1, 3);
}

TEST(Scheduler, OverlappedStepAfterAStopTokenDropsItsRow) {
  Driver d({.num_blocks = 16, .block_size = 8});
  const SeqId a = d.add(iota_tokens(4, 100), stop_params(10, 0, false, {}, {2}));
  const SeqId b = d.add(iota_tokens(4, 200), max_tokens(3));
  d.schedule();
  const Step st2 = d.schedule();
  ASSERT_EQ(st2.seq_ids, (SeqIds{a, b}));
  const std::vector<FinishedSequence> fin = d.postprocess(std::vector<TokenId>{2, 7});  // a draws EOS
  ASSERT_EQ(fin.size(), 1u);
  EXPECT_EQ(fin[0].id, a);
  EXPECT_EQ(fin[0].reason, FinishReason::kStop);
  EXPECT_EQ(fin[0].num_generated_tokens, 1);
  EXPECT_EQ(d.s.find(a), nullptr);
  EXPECT_EQ(d.s.num_running(), 1);
  EXPECT_EQ(d.s.allocator().num_used_blocks(), 1);  // a's block is free although step 2 writes to it
  EXPECT_TRUE(d.postprocess(std::vector<TokenId>{9, 8}).empty());  // a's row: dropped
  EXPECT_EQ(d.s.find(b)->token_ids, (std::vector<TokenId>{200, 201, 202, 203, 7, 8}));
  d.drain_overlapped();
  EXPECT_EQ(d.generated[a], (std::vector<TokenId>{2}));
}

TEST(SchedulerConfig, ValidateRejectsBadValues) {
  EXPECT_NO_THROW(SchedulerConfig{}.validate());
  const std::vector<std::function<void(SchedulerConfig&)>> bad = {
      [](SchedulerConfig& c) { c.num_blocks = 0; },
      [](SchedulerConfig& c) { c.num_blocks = -3; },
      [](SchedulerConfig& c) { c.block_size = 4; },
      [](SchedulerConfig& c) { c.block_size = 12; },
      [](SchedulerConfig& c) { c.block_size = 512; },
      [](SchedulerConfig& c) { c.max_num_seqs = 0; },
      [](SchedulerConfig& c) { c.max_num_batched_tokens = 0; },
      [](SchedulerConfig& c) { c.max_model_len = 1; },
      // 2^24 blocks of 256 slots overflow int32 slot ids.
      [](SchedulerConfig& c) {
        c.num_blocks = 1 << 24;
        c.block_size = 256;
      },
  };
  for (size_t i = 0; i < bad.size(); ++i) {
    SchedulerConfig c;
    bad[i](c);
    EXPECT_THROW(c.validate(), InvalidArgument) << "case " << i;
    EXPECT_THROW(Scheduler{c}, InvalidArgument) << "case " << i;
  }
  const SchedulerConfig smallest{.num_blocks = 1, .block_size = 8, .max_num_seqs = 1, .max_num_batched_tokens = 1,
                                 .max_model_len = 2};
  EXPECT_NO_THROW(smallest.validate());
  EXPECT_NO_THROW(Scheduler{smallest});
}
