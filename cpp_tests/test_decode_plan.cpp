// The launch plan of paged_attention_decode on CUDA (decode_plan.h): partitions, head tiles, grid
// and scratch sizes, which depend on shapes only.
#include "pnl/kernels/cuda/decode_plan.h"

#include <gtest/gtest.h>

namespace pnl::kernels::cuda {
namespace {

// Qwen3-0.6B heads (H=16, Hkv=8, D=128) in bf16 (8 elements per 16-byte load).
DecodeShape qwen3(int64_t num_seqs, int64_t block_size, int64_t max_blocks) {
  return {num_seqs, 16, 8, 128, block_size, max_blocks, 8, 8};
}

TEST(DecodePlan, PartitionSizeIsAMultipleOfTheMinimumAndBoundsThePartitions) {
  EXPECT_EQ(decode_partition_size(1), kDecodeMinPartition);
  EXPECT_EQ(decode_partition_size(512), 512);
  EXPECT_EQ(decode_partition_size(4096), 512);
  EXPECT_EQ(decode_partition_size(8192), 512);   // exactly kDecodeMaxPartitions of the minimum
  EXPECT_EQ(decode_partition_size(8193), 1024);  // one key more: longer partitions, not a 17th
  EXPECT_EQ(decode_partition_size(40960), 2560);
  for (int64_t context = 1; context <= 300000; context += 977) {
    const int64_t p = decode_partition_size(context);
    EXPECT_EQ(p % kDecodeMinPartition, 0) << context;
    EXPECT_LE((context + p - 1) / p, kDecodeMaxPartitions) << context;
  }
}

TEST(DecodePlan, LongContextsOfTheBenchmark) {
  // 256 sequences, a table wide enough for 4096 tokens in blocks of 16.
  const DecodePlan p = plan_decode(qwen3(256, 16, 256));
  EXPECT_EQ(p.group, 2);
  EXPECT_EQ(p.head_chunks, 1);
  EXPECT_EQ(p.heads_per_chunk, 2);
  EXPECT_EQ(p.heads_per_cta, 2);
  EXPECT_EQ(p.vec_width, 8);
  EXPECT_EQ(p.row_threads, 16);  // 128 bf16 = 16 threads x 8
  EXPECT_EQ(p.partition_size, 512);
  EXPECT_EQ(p.num_partitions, 8);
  EXPECT_EQ(p.num_ctas, 256 * 8 * 8);
  EXPECT_TRUE(p.merge);
  EXPECT_EQ(p.partial_rows, 256 * 16 * 8);
  EXPECT_EQ(p.partial_elems, 256 * 16 * 8 * 128);
}

TEST(DecodePlan, ShortTableNeedsNoMerge) {
  const DecodePlan p = plan_decode(qwen3(3, 16, 32));  // 512 tokens at most: one partition
  EXPECT_EQ(p.num_partitions, 1);
  EXPECT_FALSE(p.merge);
  EXPECT_EQ(p.partial_rows, 0);
  EXPECT_EQ(p.partial_elems, 0);
  EXPECT_EQ(p.num_ctas, 3 * 8);
}

TEST(DecodePlan, PartitionsCoverTheWholeTable) {
  for (const int64_t block_size : {1, 8, 16, 256}) {
    for (const int64_t max_blocks : {0, 1, 2, 31, 32, 33, 255, 1000, 2561}) {
      const DecodePlan p = plan_decode(qwen3(1, block_size, max_blocks));
      const int64_t capacity = block_size * max_blocks;
      EXPECT_GE(p.num_partitions * p.partition_size, capacity) << block_size << " x " << max_blocks;
      EXPECT_LT((p.num_partitions - 1) * p.partition_size, std::max<int64_t>(capacity, 1));
      EXPECT_EQ(p.merge, p.num_partitions > 1);
    }
  }
}

TEST(DecodePlan, DoesNotDependOnTheBatchSize) {
  // A sequence's partitioning (hence its rounding) is the same whatever it is batched with.
  const DecodePlan one = plan_decode(qwen3(1, 16, 300)), many = plan_decode(qwen3(200, 16, 300));
  EXPECT_EQ(one.partition_size, many.partition_size);
  EXPECT_EQ(one.num_partitions, many.num_partitions);
  EXPECT_EQ(one.row_threads, many.row_threads);
  EXPECT_EQ(one.heads_per_cta, many.heads_per_cta);
  EXPECT_EQ(many.num_ctas, 200 * one.num_ctas);
}

TEST(DecodePlan, RowThreadsFollowHeadDim) {
  const auto row_threads = [](int64_t head_dim, int64_t vec_width) {
    return plan_decode({1, 4, 4, head_dim, 16, 4, vec_width, 8}).row_threads;
  };
  EXPECT_EQ(row_threads(16, 8), 8);  // at least 8 threads; the others are masked
  EXPECT_EQ(row_threads(64, 8), 8);
  EXPECT_EQ(row_threads(72, 8), 16);
  EXPECT_EQ(row_threads(80, 4), 16);
  EXPECT_EQ(row_threads(128, 2), 16);
  EXPECT_EQ(row_threads(136, 8), 32);
  EXPECT_EQ(row_threads(256, 4), 32);
  EXPECT_EQ(row_threads(64, 1), 32);  // the scalar kernel: always a warp per row
  EXPECT_EQ(row_threads(255, 1), 32);
  for (int64_t d = 1; d <= kDecodeMaxHeadDim; ++d) {
    EXPECT_GE(row_threads(d, 8) * kDecodeRowElems, d) << d;
  }
}

TEST(DecodePlan, HeadTiles) {
  const auto plan = [](int64_t heads, int64_t kv_heads, int64_t max_heads) {
    return plan_decode({2, heads, kv_heads, 64, 16, 10, 8, max_heads});
  };
  DecodePlan p = plan(4, 4, 8);  // MHA
  EXPECT_EQ(p.group, 1);
  EXPECT_EQ(p.heads_per_cta, 1);
  EXPECT_EQ(p.head_chunks, 1);
  p = plan(9, 3, 8);  // GQA 3: a tile of 4, one head padding
  EXPECT_EQ(p.heads_per_chunk, 3);
  EXPECT_EQ(p.heads_per_cta, 4);
  EXPECT_EQ(p.head_chunks, 1);
  p = plan(64, 8, 8);  // GQA 8: the widest tile
  EXPECT_EQ(p.heads_per_cta, 8);
  EXPECT_EQ(p.head_chunks, 1);
  p = plan(16, 1, 8);  // MQA 16: two chunks of 8, K/V read twice
  EXPECT_EQ(p.head_chunks, 2);
  EXPECT_EQ(p.heads_per_chunk, 8);
  EXPECT_EQ(p.heads_per_cta, 8);
  EXPECT_EQ(p.num_ctas, 2 * 1 * 2 * p.num_partitions);
  p = plan(12, 1, 8);  // 12 = 6 + 6 in tiles of 8
  EXPECT_EQ(p.head_chunks, 2);
  EXPECT_EQ(p.heads_per_chunk, 6);
  EXPECT_EQ(p.heads_per_cta, 8);
  p = plan(8, 1, 2);  // fp64's tiles of 2
  EXPECT_EQ(p.head_chunks, 4);
  EXPECT_EQ(p.heads_per_cta, 2);
  p = plan(9, 3, 2);  // 3 = 2 + 1 in tiles of 2
  EXPECT_EQ(p.head_chunks, 2);
  EXPECT_EQ(p.heads_per_chunk, 2);
  for (int64_t group = 1; group <= 64; ++group) {
    p = plan(group, 1, 8);
    EXPECT_LE(p.heads_per_cta, 8) << group;
    EXPECT_GE(p.heads_per_cta, p.heads_per_chunk) << group;
    EXPECT_GE(p.head_chunks * p.heads_per_chunk, group) << group;
    EXPECT_LT((p.head_chunks - 1) * p.heads_per_chunk, group) << group;  // no empty chunk
  }
}

TEST(DecodePlan, NextPow2) {
  EXPECT_EQ(next_pow2(0), 1);
  EXPECT_EQ(next_pow2(1), 1);
  EXPECT_EQ(next_pow2(3), 4);
  EXPECT_EQ(next_pow2(8), 8);
  EXPECT_EQ(next_pow2(9), 16);
}

}  // namespace
}  // namespace pnl::kernels::cuda
