// Host-side plan of paged_attention_decode on CUDA: how the work is cut into CTAs, and how much
// scratch the partial results need. Plain C++ (no CUDA syntax), so cpp_tests check it without a GPU.
//
// A CTA handles one (sequence, KV head, head chunk, partition of the context). The plan depends on
// shapes only, never on context_lens (which live on the device): the grid covers the longest
// context the block table can describe, so one plan serves every replay of a captured CUDA graph,
// and CTAs past a sequence's real context exit at once. Nor does it depend on the batch size, so
// a sequence gets bitwise the same result whatever it is batched with (for one table width).
#pragma once

#include <algorithm>
#include <cstdint>

namespace pnl::kernels::cuda {

/// Threads per CTA of the decode kernel.
inline constexpr int64_t kDecodeThreads = 128;
/// Elements of a K/V row each thread covers: one 16-byte load of bf16/fp16, two of fp32, four of fp64.
inline constexpr int64_t kDecodeRowElems = 8;
/// The largest head_dim: a row is covered by at most one warp (32 threads x kDecodeRowElems).
inline constexpr int64_t kDecodeMaxHeadDim = 32 * kDecodeRowElems;
/// Keys per partition at least; partition sizes are multiples of it.
inline constexpr int64_t kDecodeMinPartition = 512;
/// Partitions per sequence at most: a wider block table gets longer partitions instead, which
/// bounds the scratch and the merge (the merge kernel holds one weight per partition in a warp).
inline constexpr int64_t kDecodeMaxPartitions = 16;

struct DecodeShape {
  int64_t num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks;
  int64_t vec_width;          // elements per 16-byte load of K/V, or 1 when the caches allow no vector loads
  int64_t max_heads_per_cta;  // the widest head tile the kernel has for this dtype
};

struct DecodePlan {
  int64_t group = 0;            // query heads per KV head
  int64_t head_chunks = 0;      // CTAs across one KV head's group: 1 unless group > max_heads_per_cta
  int64_t heads_per_chunk = 0;  // query heads per chunk (the last chunk may have fewer)
  int64_t heads_per_cta = 0;    // the kernel's head tile: heads_per_chunk rounded up to a power of 2
  int64_t vec_width = 0;        // elements per K/V load: 16 / sizeof(T), or 1 (the scalar kernel)
  int64_t row_threads = 0;      // threads per K/V row: 8, 16 or 32 (always 32 for the scalar kernel)
  int64_t partition_size = 0;   // keys per CTA
  int64_t num_partitions = 0;   // CTAs along one sequence's context
  int64_t num_ctas = 0;         // S * Hkv * head_chunks * num_partitions
  bool merge = false;           // num_partitions > 1: long contexts write partials, a second kernel merges them
  int64_t partial_rows = 0;     // S * H * num_partitions when merging, else 0: one max and one sum each
  int64_t partial_elems = 0;    // partial_rows * head_dim: the unnormalised partial outputs
};

/// The smallest power of 2 >= n (1 for n <= 1).
constexpr int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

/// Keys per partition for a block table of max_context = max_blocks * block_size keys: 512, or
/// longer so that no table needs more than kDecodeMaxPartitions partitions.
constexpr int64_t decode_partition_size(int64_t max_context) {
  const int64_t m = kDecodeMinPartition;
  const int64_t even_split = (std::max<int64_t>(max_context, 1) + kDecodeMaxPartitions - 1) / kDecodeMaxPartitions;
  return std::max(m, (even_split + m - 1) / m * m);
}

/// The plan of one call. Requires num_kv_heads > 0, num_heads a multiple of it, 0 < head_dim <=
/// kDecodeMaxHeadDim and max_heads_per_cta a power of 2.
constexpr DecodePlan plan_decode(const DecodeShape& s) {
  DecodePlan p;
  p.group = s.num_heads / s.num_kv_heads;
  p.head_chunks = std::max<int64_t>(1, (p.group + s.max_heads_per_cta - 1) / s.max_heads_per_cta);
  p.heads_per_chunk = (p.group + p.head_chunks - 1) / p.head_chunks;
  p.heads_per_cta = next_pow2(p.heads_per_chunk);
  // The scalar kernel exists for 32 threads per row only (odd head_dim is rare).
  const int64_t row_threads = next_pow2((s.head_dim + kDecodeRowElems - 1) / kDecodeRowElems);
  p.vec_width = s.vec_width;
  p.row_threads = s.vec_width == 1 ? 32 : std::clamp<int64_t>(row_threads, 8, 32);
  const int64_t max_context = std::max<int64_t>(s.max_blocks * s.block_size, 1);
  p.partition_size = decode_partition_size(max_context);
  p.num_partitions = (max_context + p.partition_size - 1) / p.partition_size;
  p.num_ctas = s.num_seqs * s.num_kv_heads * p.head_chunks * p.num_partitions;
  p.merge = p.num_partitions > 1;
  p.partial_rows = p.merge ? s.num_seqs * s.num_heads * p.num_partitions : 0;
  p.partial_elems = p.partial_rows * s.head_dim;
  return p;
}

}  // namespace pnl::kernels::cuda
