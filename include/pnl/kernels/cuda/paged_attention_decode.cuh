// paged_attention_decode on the GPU, flash-decoding style. Torch-free.
//
// A CTA of kDecodeThreads threads handles one (sequence, KV head, head chunk, partition) (see
// decode_plan.h): the query heads of a GQA group share the CTA, so each K/V row is read from HBM
// once per KV head. The threads form rows of kRowThreads, each thread covering kDecodeRowElems
// elements of a K/V row (one 16-byte load of bf16); a row of threads takes every kRows-th key of
// the partition, kUnroll keys per step, and keeps its own online softmax (running max, sum and
// unnormalised output per head) in registers. The loop has no barrier and no shared memory: all
// K and V loads of a step are issued before the first is used. The rows' states are merged
// through shared memory at the end. Scores are kept in log2 units (q is pre-scaled by
// scale * log2(e)), so every exponential is an exp2.
//
// A sequence whose context fits one partition is written directly; longer ones write per
// partition (max, sum, output) partials, which a second kernel merges by log-sum-exp.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "pnl/kernels/cuda/common.cuh"
#include "pnl/kernels/cuda/decode_plan.h"
#include "pnl/kernels/rows.h"

namespace pnl::kernels::cuda {

/// The widest head tile (query heads per CTA) for T: fp64 (a test dtype) holds 2 heads' registers.
template <typename T>
inline constexpr int64_t kDecodeMaxHeadsPerCta = sizeof(T) == 8 ? 2 : 8;

template <typename T>
struct DecodeArgs {
  T* out;                       // [S, H, D], rows at out_rows (row = s * H + h)
  const T* query;               // [S, H, D], rows at query_rows
  const T* k_cache;             // [num_blocks, block_size, Hkv, D], contiguous
  const T* v_cache;             // [num_blocks, block_size, Hkv, D], contiguous
  const int32_t* context_lens;  // [S]
  const int32_t* block_tables;  // [S, max_blocks]
  acc_t<T>* part_max;           // [S, H, num_partitions], log2 units (merge only, else null)
  acc_t<T>* part_sum;           // [S, H, num_partitions]
  acc_t<T>* part_out;           // [S, H, num_partitions, D], unnormalised
  Rows out_rows, query_rows;
  int64_t num_heads, num_kv_heads, head_dim, num_blocks, block_size, max_blocks;
  acc_t<T> scale_log2;  // softmax scale * log2(e)
};

namespace decode_detail {

/// kVec consecutive elements loaded at once: a Vec16 (16 bytes) or a single element.
template <typename T>
struct Scalar {
  static constexpr int kSize = 1;
  T v[1];
};
template <typename T, int kVec>
using Chunk = std::conditional_t<kVec == 1, Scalar<T>, Vec16<T>>;

template <typename T, int kVec>
__device__ __forceinline__ Chunk<T, kVec> load_chunk(const T* p) {
  if constexpr (kVec == 1) {
    return {{*p}};
  } else {
    return load16(p);
  }
}

template <typename T, int kVec>
__device__ __forceinline__ Chunk<T, kVec> zero_chunk() {
  Chunk<T, kVec> c;
#pragma unroll
  for (int i = 0; i < kVec; ++i) c.v[i] = from_acc<T>(acc_t<T>(0));
  return c;
}

/// Keys per row of threads per step, 1 to 4: 4 for bf16 with 1-2 heads per CTA (8 independent
/// 16-byte loads per thread), fewer as the query and output registers (2 * kGroup *
/// kDecodeRowElems) grow (1 for bf16 with 8 heads), a quarter for the scalar kernel (8 loads per
/// row), so that no variant spills.
template <typename T, int kVec, int kGroup>
constexpr int unroll() {
  constexpr int u = 16 / (kGroup * static_cast<int>(sizeof(T)) * (kVec == 1 ? 4 : 1));
  return u < 1 ? 1 : (u > 4 ? 4 : u);
}

/// CTAs per SM the register budget aims at (__launch_bounds__; <= 168 or 255 registers): without
/// it ptxas may cap a kernel at 128 registers and spill.
template <typename T, int kGroup>
constexpr int min_ctas_per_sm() {
  return kGroup == 8 || sizeof(T) == 8 ? 2 : 3;
}

/// A sequence's context, clamped to what its block table can describe (a bad length must not
/// read past the table row).
__device__ __forceinline__ int64_t context_of(const int32_t* context_lens, int64_t seq, int64_t capacity) {
  const int64_t n = context_lens[seq];
  return n < 0 ? 0 : (n > capacity ? capacity : n);
}

}  // namespace decode_detail

/// One CTA per (sequence, KV head, head chunk, partition); blockIdx.x enumerates them partition
/// fastest. kVec: elements per load (16 / sizeof(T), or 1); kRowThreads: threads per K/V row;
/// kGroup: the head tile (>= the heads of a chunk, a power of 2).
template <typename T, int kVec, int kRowThreads, int kGroup>
__global__ void __launch_bounds__(kDecodeThreads, decode_detail::min_ctas_per_sm<T, kGroup>())
    paged_attention_decode_kernel(const DecodeArgs<T> a, const int64_t group, const int64_t heads_per_chunk,
                                  const int64_t head_chunks, const int64_t partition_size,
                                  const int64_t num_partitions) {
  using A = acc_t<T>;
  using C = decode_detail::Chunk<T, kVec>;
  constexpr int kThreads = static_cast<int>(kDecodeThreads);
  constexpr int kElems = static_cast<int>(kDecodeRowElems);
  constexpr int kRows = kThreads / kRowThreads;  // rows of threads: keys handled side by side
  constexpr int kChunks = kElems / kVec;         // loads per K/V row per thread
  constexpr int kUnroll = decode_detail::unroll<T, kVec, kGroup>();
  constexpr int kStep = kRows * kUnroll;  // keys per step of the CTA
  constexpr int kDimPad = kRowThreads * kElems;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  static_assert(kElems % kVec == 0 && kRowThreads <= 32 && 32 % kRowThreads == 0);

  const int tid = static_cast<int>(threadIdx.x), row = tid / kRowThreads, lane = tid % kRowThreads;
  int64_t block = blockIdx.x;
  const int64_t part = block % num_partitions;
  block /= num_partitions;
  const int64_t chunk = block % head_chunks;
  block /= head_chunks;
  const int64_t kv_head = block % a.num_kv_heads, seq = block / a.num_kv_heads;

  const int64_t context = decode_detail::context_of(a.context_lens, seq, a.max_blocks * a.block_size);
  const int64_t begin = part * partition_size;
  if (begin >= context && part > 0) return;  // past this sequence's context (uniform over the CTA)
  const int64_t end = begin + partition_size < context ? begin + partition_size : context;
  const int64_t first = chunk * heads_per_chunk;                  // first head of the chunk in the group
  const int heads = static_cast<int>(heads_per_chunk < group - first ? heads_per_chunk : group - first);
  const int64_t head0 = kv_head * group + first;                  // its query head
  const int64_t D = a.head_dim;

  // This thread's elements of a row: chunk c covers [dim[c], dim[c] + kVec), coalesced across lanes.
  int dim[kChunks];
  bool dim_ok[kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    dim[c] = (c * kRowThreads + lane) * kVec;
    dim_ok[c] = dim[c] < D;  // D % kVec == 0 on the vector path: a chunk is all in or all out
  }

  A q[kGroup][kElems];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    const T* qh = g < heads ? a.query + a.query_rows.offset(seq * a.num_heads + head0 + g) : nullptr;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        q[g][c * kVec + i] = g < heads && dim_ok[c] ? to_acc(qh[dim[c] + i]) * a.scale_log2 : A(0);
      }
    }
  }

  A m[kGroup], l[kGroup], acc[kGroup][kElems];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    m[g] = kNegInf;
    l[g] = A(0);
#pragma unroll
    for (int e = 0; e < kElems; ++e) acc[g][e] = A(0);
  }

  const int32_t* table = a.block_tables + seq * a.max_blocks;
  const int64_t token_stride = a.num_kv_heads * D;
  const T* k_head = a.k_cache + kv_head * D;
  const T* v_head = a.v_cache + kv_head * D;
  const uint32_t block_size = static_cast<uint32_t>(a.block_size);
  const uint32_t num_blocks = static_cast<uint32_t>(a.num_blocks);

  // The trip count is the same for every thread: the shuffles below need the whole warp.
  for (int64_t t0 = begin; t0 < end; t0 += kStep) {
    int64_t offset[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = t0 + u * kRows + row;  // rows interleave: a warp reads neighbouring keys
      ok[u] = j < end;
      offset[u] = 0;
      if (ok[u]) {
        const uint32_t pos = static_cast<uint32_t>(j), b = pos / block_size;
        const uint32_t id = static_cast<uint32_t>(table[b]);
        ok[u] = id < num_blocks;  // a bad block id (e.g. -1) is skipped, never read
        offset[u] = (static_cast<int64_t>(id) * block_size + (pos - b * block_size)) * token_stride;
      }
    }
    C kb[kUnroll][kChunks], vb[kUnroll][kChunks];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        if (ok[u] && dim_ok[c]) {
          kb[u][c] = decode_detail::load_chunk<T, kVec>(k_head + offset[u] + dim[c]);
          vb[u][c] = decode_detail::load_chunk<T, kVec>(v_head + offset[u] + dim[c]);
        } else {
          kb[u][c] = decode_detail::zero_chunk<T, kVec>();
          vb[u][c] = decode_detail::zero_chunk<T, kVec>();
        }
      }
    }

    A s[kGroup][kUnroll];  // scores, log2 units
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      A k[kElems];
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) k[c * kVec + i] = to_acc(kb[u][c].v[i]);
      }
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        A x = A(0);
#pragma unroll
        for (int e = 0; e < kElems; ++e) x += q[g][e] * k[e];
        s[g][u] = x;
      }
    }
    // Sum over the row's lanes (an aligned group of kRowThreads lanes); every lane gets the same bits.
#pragma unroll
    for (int offset_lanes = kRowThreads / 2; offset_lanes > 0; offset_lanes /= 2) {
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) s[g][u] += __shfl_xor_sync(0xffffffffu, s[g][u], offset_lanes);
      }
    }

    A v[kUnroll][kElems];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) v[u][c * kVec + i] = to_acc(vb[u][c].v[i]);
      }
    }
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      A new_max = m[g];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (!ok[u]) s[g][u] = kNegInf;
        new_max = fmax(new_max, s[g][u]);
      }
      const A base = new_max == kNegInf ? A(0) : new_max;  // no -inf - -inf while a row has seen no key
      const A alpha = exp2(m[g] - base);                   // 0 on a row's first keys
      m[g] = new_max;
      l[g] *= alpha;
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[g][e] *= alpha;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const A p = exp2(s[g][u] - base);  // 0 for a skipped key
        l[g] += p;
#pragma unroll
        for (int e = 0; e < kElems; ++e) acc[g][e] += p * v[u][e];
      }
    }
  }

  // Merge the rows' states: weight_r = 2^(m_r - M) per head, in a fixed order (deterministic).
  __shared__ A row_out[kRows][kGroup][kDimPad];
  __shared__ A row_weight[kRows][kGroup];  // first each row's max, then its weight
  __shared__ A row_sum[kRows][kGroup];
  __shared__ A head_max[kGroup], head_sum[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    if (lane == 0) {
      row_weight[row][g] = m[g];
      row_sum[row][g] = l[g];
    }
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) row_out[row][g][dim[c] + i] = acc[g][c * kVec + i];
    }
  }
  __syncthreads();
  if (tid < kGroup) {
    A max_all = kNegInf;
    for (int r = 0; r < kRows; ++r) max_all = fmax(max_all, row_weight[r][tid]);
    A sum = A(0);
    for (int r = 0; r < kRows; ++r) {
      const A w = row_weight[r][tid] == kNegInf ? A(0) : exp2(row_weight[r][tid] - max_all);
      row_weight[r][tid] = w;
      sum += w * row_sum[r][tid];
    }
    head_max[tid] = max_all;
    head_sum[tid] = sum;
  }
  __syncthreads();

  const bool whole = context <= partition_size;  // one partition: the final output, no merge
  for (int64_t idx = tid; idx < heads * D; idx += kThreads) {
    const int g = static_cast<int>(idx / D);
    const int64_t d = idx - g * D;
    A o = A(0);
    for (int r = 0; r < kRows; ++r) o += row_out[r][g][d] * row_weight[r][g];
    const int64_t head_row = seq * a.num_heads + head0 + g;
    if (whole) {
      const A sum = head_sum[g];
      a.out[a.out_rows.offset(head_row) + d] = from_acc<T>(sum > A(0) ? o / sum : A(0));
    } else {
      a.part_out[(head_row * num_partitions + part) * D + d] = o;
    }
  }
  if (!whole && tid < heads) {
    const int64_t p = (seq * a.num_heads + head0 + tid) * num_partitions + part;
    a.part_max[p] = head_max[tid];
    a.part_sum[p] = head_sum[tid];
  }
}

/// Merges the partitions of one (sequence, head) per CTA: with M the largest partition max,
/// out = sum_p 2^(max_p - M) out_p / sum_p 2^(max_p - M) sum_p. Sequences that fit one partition
/// were written by the first kernel.
template <typename T>
__global__ void paged_attention_decode_merge_kernel(const DecodeArgs<T> a, const int64_t partition_size,
                                                    const int64_t num_partitions) {
  using A = acc_t<T>;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  static_assert(kDecodeMaxPartitions <= 32, "one lane per partition");
  const int64_t head_row = blockIdx.x, seq = head_row / a.num_heads;
  const int64_t context = decode_detail::context_of(a.context_lens, seq, a.max_blocks * a.block_size);
  if (context <= partition_size) return;
  const int n = static_cast<int>(ceil_div(context, partition_size));  // <= num_partitions
  const int64_t first = head_row * num_partitions;

  __shared__ A weight[32];
  __shared__ A total;
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < 32) {
    const A m = tid < n ? a.part_max[first + tid] : kNegInf;
    const A max_all = warp_max(m);
    const A w = tid < n && m != kNegInf ? exp2(m - max_all) : A(0);  // no -inf - -inf: all-empty gives 0
    weight[tid] = w;
    const A sum = warp_sum(tid < n ? w * a.part_sum[first + tid] : A(0));
    if (tid == 0) total = sum;
  }
  __syncthreads();
  const A inv = total > A(0) ? A(1) / total : A(0);
  const A* outs = a.part_out + first * a.head_dim;
  T* y = a.out + a.out_rows.offset(head_row);
  for (int64_t d = tid; d < a.head_dim; d += blockDim.x) {
    A o = A(0);
    for (int p = 0; p < n; ++p) o += weight[p] * outs[p * a.head_dim + d];
    y[d] = from_acc<T>(o * inv);
  }
}

namespace decode_detail {

template <typename T, int kVec, int kRowThreads, int kGroup>
void launch(const DecodeArgs<T>& a, const DecodePlan& plan, cudaStream_t stream) {
  paged_attention_decode_kernel<T, kVec, kRowThreads, kGroup>
      <<<static_cast<unsigned>(plan.num_ctas), kDecodeThreads, 0, stream>>>(
          a, plan.group, plan.heads_per_chunk, plan.head_chunks, plan.partition_size, plan.num_partitions);
}

template <typename T, int kVec, int kRowThreads>
void launch_heads(const DecodeArgs<T>& a, const DecodePlan& plan, cudaStream_t stream) {
  switch (plan.heads_per_cta) {
    case 1: return launch<T, kVec, kRowThreads, 1>(a, plan, stream);
    case 2: return launch<T, kVec, kRowThreads, 2>(a, plan, stream);
    default:
      if constexpr (kDecodeMaxHeadsPerCta<T> >= 8) {
        if (plan.heads_per_cta == 4) return launch<T, kVec, kRowThreads, 4>(a, plan, stream);
        return launch<T, kVec, kRowThreads, 8>(a, plan, stream);
      }
  }
}

}  // namespace decode_detail

/// The plan for these caches: 16-byte loads when both caches start 16-byte aligned and head_dim
/// is a multiple of 16 / sizeof(T) elements, else one element at a time.
template <typename T>
DecodePlan plan_paged_attention_decode(const T* k_cache, const T* v_cache, int64_t num_seqs, int64_t num_heads,
                                       int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                                       int64_t max_blocks) {
  const bool vec = aligned16(k_cache, head_dim) && aligned16(v_cache, head_dim);
  return plan_decode({num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks,
                      vec ? Vec16<T>::kSize : 1, kDecodeMaxHeadsPerCta<T>});
}

/// Launches the decode kernel (and the merge when plan.merge) on `stream`, with the plan of
/// plan_paged_attention_decode for these arguments. a.part_* must hold plan.partial_rows,
/// plan.partial_rows and plan.partial_elems elements when plan.merge. Requires 0 < head_dim <=
/// kDecodeMaxHeadDim and num_ctas < 2^31.
template <typename T>
cudaError_t paged_attention_decode(const DecodeArgs<T>& a, const DecodePlan& plan, cudaStream_t stream) {
  if (plan.num_ctas == 0) return cudaSuccess;
  using namespace decode_detail;
  constexpr int kVec = Vec16<T>::kSize;
  if (plan.vec_width == 1) {
    launch_heads<T, 1, 32>(a, plan, stream);
  } else if (plan.row_threads == 8) {
    launch_heads<T, kVec, 8>(a, plan, stream);
  } else if (plan.row_threads == 16) {
    launch_heads<T, kVec, 16>(a, plan, stream);
  } else {
    launch_heads<T, kVec, 32>(a, plan, stream);
  }
  if (plan.merge) {
    const unsigned threads = static_cast<unsigned>(std::min<int64_t>(256, ceil_div(a.head_dim, 32) * 32));
    paged_attention_decode_merge_kernel<T><<<static_cast<unsigned>(a.out_rows.count), threads, 0, stream>>>(
        a, plan.partition_size, plan.num_partitions);
  }
  return cudaGetLastError();
}

}  // namespace pnl::kernels::cuda
