// The tile slots of the CUDA prefill (prefill_plan.h): every query tile of every sequence gets
// exactly one slot of the launch, found back by the device's binary search, and few slots idle.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "pnl/kernels/cuda/prefill_plan.h"

using namespace pnl::kernels;

namespace {

std::vector<int32_t> cumulative(const std::vector<int32_t>& q_lens) {
  std::vector<int32_t> cu{0};
  for (int32_t q : q_lens) cu.push_back(cu.back() + q);
  return cu;
}

/// Checks the plan of one batch: each tile (s, j) owns one slot, no two tiles share one, every
/// other slot decodes to an empty tile, and at most one slot per sequence idles.
void check_plan(const std::vector<int32_t>& q_lens, int block_m) {
  const std::vector<int32_t> cu = cumulative(q_lens);
  const auto num_seqs = static_cast<int32_t>(q_lens.size());
  const int64_t num_slots = prefill_num_slots(cu.back(), num_seqs, block_m);
  std::vector<int> owners(num_slots, 0);
  for (int32_t s = 0; s < num_seqs; ++s) {
    for (int64_t j = 0; j * block_m < q_lens[s]; ++j) {
      const int64_t slot = prefill_slot_begin(cu[s], s, block_m) + j;
      ASSERT_LT(slot, num_slots) << "sequence " << s << " tile " << j;
      ++owners[slot];
      const PrefillTile tile = prefill_tile_of_slot(cu.data(), num_seqs, slot, block_m);
      EXPECT_EQ(tile.seq, s);
      EXPECT_EQ(tile.first_token, j * block_m);
    }
  }
  int64_t idle = 0;
  for (int64_t slot = 0; slot < num_slots; ++slot) {
    EXPECT_LE(owners[slot], 1) << "slot " << slot;
    if (owners[slot] == 1) continue;
    ++idle;
    const PrefillTile tile = prefill_tile_of_slot(cu.data(), num_seqs, slot, block_m);
    ASSERT_GE(tile.seq, 0);
    ASSERT_LT(tile.seq, num_seqs);
    EXPECT_GE(tile.first_token, q_lens[tile.seq]) << "slot " << slot << " decodes to a real tile twice";
  }
  EXPECT_LE(idle, num_seqs);
}

TEST(PrefillPlan, OneSequence) {
  for (int32_t q : {1, 63, 64, 65, 128, 1000}) check_plan({q}, 64);
}

TEST(PrefillPlan, EmptySequencesAndTileBoundaries) {
  check_plan({0, 0, 5, 0}, 64);
  check_plan({64, 64, 64}, 64);
  check_plan({63, 1, 63, 1, 0, 65}, 64);
  check_plan({1, 1, 1, 1, 1, 1, 1, 1}, 64);
}

TEST(PrefillPlan, RandomBatches) {
  std::mt19937 rng(7);
  for (int block_m : {16, 64, 128}) {
    for (int trial = 0; trial < 200; ++trial) {
      const int num_seqs = std::uniform_int_distribution<int>(1, 40)(rng);
      const int max_len = trial % 2 ? 5 : 700;
      std::vector<int32_t> q_lens(num_seqs);
      for (int32_t& q : q_lens) q = std::uniform_int_distribution<int32_t>(0, max_len)(rng);
      check_plan(q_lens, block_m);
    }
  }
}

TEST(PrefillPlan, SlotCountBoundsTheTiles) {
  // 256 sequences of ~600 tokens: T / 64 + S slots, not S * ceil(T / 64).
  const std::vector<int32_t> q_lens(256, 600);
  EXPECT_EQ(prefill_num_slots(256 * 600, 256, 64), 2400 + 256);
  check_plan(q_lens, 64);
}

}  // namespace
