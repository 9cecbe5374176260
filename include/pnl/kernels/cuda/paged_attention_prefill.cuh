// paged_attention_prefill on the GPU. Torch-free; T is float, double, __half or __nv_bfloat16.
//
// The new tokens of sequence s are the last q_len of its context_len tokens (their K/V already in
// the cache); new token i sits at position context_len - q_len + i and attends causally to keys
// 0..that position, read through the sequence's block table.
//
// Half types with head_dim 64, 128 or 256 and 16-byte aligned rows take the tensor-core kernel,
// FlashAttention-2's forward pass: a CTA of 4 warps owns 64 query rows of one head (16 per warp),
// and streams the keys kBlockN at a time through double-buffered shared memory (cp.async, gathered
// row by row through the block table, so a tile may span pages of any size). Per key tile each warp
// computes S = Q K^T (mma.m16n8k16, fp32 accumulators), masks the causal diagonal, updates its
// online softmax in registers, and adds P V with P rounded to T, as FlashAttention does. Everything
// else (float, double, other head_dims, unaligned rows) takes a simple kernel, a warp per (token,
// head), whose arithmetic runs in acc_t<T>.
//
// The grid is derived from what the host knows (T tokens, S sequences, H heads), never from the
// indices, so the launch can be captured in a CUDA graph; prefill_plan.h maps a CTA to its tile.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "pnl/kernels/cuda/common.cuh"
#include "pnl/kernels/cuda/mma.cuh"
#include "pnl/kernels/cuda/prefill_plan.h"

namespace pnl::kernels::cuda {

/// Largest head_dim of the CUDA prefill.
inline constexpr int kPrefillMaxHeadDim = 256;

template <typename T>
struct PrefillArgs {
  T* out;                       // [T, H, D], rows out_token_stride apart, heads out_head_stride
  const T* query;               // [T, H, D], rows q_token_stride apart, heads q_head_stride
  const T* k_cache;             // [num_blocks, block_size, Hkv, D], contiguous
  const T* v_cache;             // [num_blocks, block_size, Hkv, D], contiguous
  const int32_t* cu_seqlens_q;  // [S + 1]
  const int32_t* context_lens;  // [S]
  const int32_t* block_tables;  // [S, max_blocks]
  int64_t q_token_stride, q_head_stride, out_token_stride, out_head_stride;
  int32_t num_tokens, num_seqs, num_heads, num_kv_heads, head_dim;
  int32_t num_blocks, block_size, max_blocks;
  double scale;
};

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel.

template <typename T, int kHeadDim>
struct PrefillMma {
  static constexpr int kBlockM = kPrefillBlockM;                 // query rows per CTA
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;      // keys per tile
  static constexpr int kWarps = kBlockM / 16;                     // 16 query rows each
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kChunks = kHeadDim / 8;                    // 16-byte chunks per row
  static constexpr int kRowBytes = kHeadDim * int(sizeof(T));
  static constexpr int kRowsPerPass = kThreads / kChunks;         // rows one copy pass covers
  static constexpr bool kQInRegisters = kHeadDim <= 128;          // else re-read from shared memory
  static constexpr int kTileBytes = kBlockN * kHeadDim * int(sizeof(T));
  static constexpr int kQBytes = kBlockM * kHeadDim * int(sizeof(T));
  static constexpr int kRowsOffset = kQBytes + 4 * kTileBytes;  // Q, then K and V, two stages each
  static constexpr int kSmemBytes = kRowsOffset + 2 * kBlockN * int(sizeof(int64_t));  // then rows_s
  static_assert(kChunks >= 8 && (kChunks & (kChunks - 1)) == 0 && kThreads % kChunks == 0,
                "the swizzle needs rows of a power of two >= 8 chunks");
  static_assert(kBlockM % kRowsPerPass == 0 && kBlockN % kRowsPerPass == 0, "copy passes must tile the rows");
  static_assert(kBlockN <= kThreads, "a thread per key of a tile finds its cache row");

  /// Byte offset of (row, 16-byte chunk) in a [rows, kHeadDim] tile: the chunk index XOR row % 8,
  /// so the 8 rows one ldmatrix reads, and the rows one copy pass writes, hit distinct banks.
  static __device__ __forceinline__ uint32_t offset(int row, int chunk) {
    return static_cast<uint32_t>((row * kChunks + (chunk ^ (row & 7))) * 16);
  }
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(PrefillMma<T, kHeadDim>::kThreads)
    paged_attention_prefill_mma_kernel(const PrefillArgs<T> a, int64_t num_slots, int block_shift) {
  using M = PrefillMma<T, kHeadDim>;
  constexpr int kBlockM = M::kBlockM, kBlockN = M::kBlockN, kChunks = M::kChunks;
  constexpr int kRowsPerPass = M::kRowsPerPass;
  constexpr int kKvPasses = kBlockN / kRowsPerPass;
  extern __shared__ __align__(128) uint8_t smem[];

  // The tile: slots in reverse, so the last (longest) tiles of each sequence start first.
  const PrefillTile tile = prefill_tile_of_slot(a.cu_seqlens_q, a.num_seqs, num_slots - 1 - blockIdx.x, kBlockM);
  const int32_t q_start = a.cu_seqlens_q[tile.seq];
  const int32_t q_len = a.cu_seqlens_q[tile.seq + 1] - q_start;
  if (tile.first_token >= q_len) return;  // an empty slot (whole CTA, before any barrier)
  const int m0 = static_cast<int>(tile.first_token);
  const int head = blockIdx.y;
  const int kv_head = head / (a.num_heads / a.num_kv_heads);
  const int first_position = a.context_lens[tile.seq] - q_len;  // of new token 0
  const int kv_end = first_position + min(q_len, m0 + kBlockM);  // keys the tile's last row sees
  const int num_kv_tiles = kv_end > 0 ? (kv_end + kBlockN - 1) / kBlockN : 0;
  const int32_t* table = a.block_tables + int64_t(tile.seq) * a.max_blocks;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int copy_chunk = threadIdx.x % kChunks, copy_row = threadIdx.x / kChunks;
  const uint32_t s_q = smem_address(smem);
  const uint32_t s_k = s_q + M::kQBytes;
  const uint32_t s_v = s_k + 2 * M::kTileBytes;

  // Q: zeros past the sequence's new tokens (those rows compute harmless finite values, never stored).
  {
    const T* q = a.query + int64_t(head) * a.q_head_stride + copy_chunk * 8;
#pragma unroll
    for (int i = 0; i < kBlockM / kRowsPerPass; ++i) {
      const int r = copy_row + i * kRowsPerPass;
      const bool valid = m0 + r < q_len;
      const T* src = valid ? q + int64_t(q_start + m0 + r) * a.q_token_stride : a.query;
      cp_async_16(s_q + M::offset(r, copy_chunk), src, valid);
    }
    cp_async_commit();
  }

  // K/V tiles, gathered row by row. Thread t < kBlockN finds the cache row of key t of a tile
  // (block id from the table, shifts and masks: block_size is a power of two) and writes its
  // element offset to rows_s, -1 past kv_end or for a block outside the cache (zero-filled: P V
  // then adds exact zeros); every thread then copies one 16-byte chunk of kKvPasses rows. Tile t's
  // block id is read in iteration t - 3, its offset written in t - 2 and its copy issued in t - 1,
  // so neither the table read nor the copy waits in line.
  int64_t* rows_s = reinterpret_cast<int64_t*>(smem + M::kRowsOffset);  // [2][kBlockN]
  const int block_mask = a.block_size - 1;
  const int64_t kv_row_stride = int64_t(a.num_kv_heads) * kHeadDim;
  int next_block = -1;  // thread t's key of the tile whose offsets are written next
  const auto read_block = [&](int kv_tile) {
    const int pos = kv_tile * kBlockN + threadIdx.x;
    // A bad context_lens (past the table's max_blocks) must not read past the table row.
    const bool in_table = pos < kv_end && (pos >> block_shift) < a.max_blocks;
    if (threadIdx.x < kBlockN) next_block = in_table ? table[pos >> block_shift] : -1;
  };
  const auto write_rows = [&](int kv_tile) {
    const int pos = kv_tile * kBlockN + threadIdx.x;
    if (threadIdx.x < kBlockN) {
      const bool valid = next_block >= 0 && next_block < a.num_blocks;
      rows_s[(kv_tile & 1) * kBlockN + threadIdx.x] =
          valid ? (int64_t(next_block) * a.block_size + (pos & block_mask)) * kv_row_stride : -1;
    }
  };
  const int64_t kv_head_offset = int64_t(kv_head) * kHeadDim + copy_chunk * 8;
  const auto copy_kv = [&](int kv_tile) {
    const int stage = kv_tile & 1;
#pragma unroll
    for (int i = 0; i < kKvPasses; ++i) {
      const int r = copy_row + i * kRowsPerPass;
      const int64_t row = rows_s[stage * kBlockN + r];
      const bool valid = row >= 0;
      const int64_t element = valid ? row + kv_head_offset : 0;
      const uint32_t dst = stage * M::kTileBytes + M::offset(r, copy_chunk);
      cp_async_16(s_k + dst, a.k_cache + element, valid);
      cp_async_16(s_v + dst, a.v_cache + element, valid);
    }
  };

  read_block(0);
  write_rows(0);
  read_block(1);
  write_rows(1);
  read_block(2);
  __syncthreads();  // rows_s of tiles 0 and 1
  if (num_kv_tiles > 0) copy_kv(0);
  cp_async_commit();

  // Per thread: rows g and g + 8 of the warp's 16 (g = lane / 4), columns 2 (lane % 4) + {0, 1}
  // of every 8-wide n-tile.
  float o[kHeadDim / 8][4];
#pragma unroll
  for (int n = 0; n < kHeadDim / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // log2 units; sums per thread
  const float scale_log2 = static_cast<float>(a.scale * 1.4426950408889634);
  const int warp_row = warp * 16;
  const int position0 = first_position + m0 + warp_row + lane / 4;  // of row g; row g + 8 is 8 later

  // Fragment addresses: each lane's row and chunk 0 or 1; chunk 2k + c sits at chunk c's offset XOR
  // 32k bytes (rows are a power of two >= 8 chunks), and 16 rows further is 16 kRowBytes more.
  // Q (A): lanes 0-15 address rows 0-15 at chunk 2k, lanes 16-31 at chunk 2k + 1. K (B, two n-tiles
  // per ldmatrix): keys 0-7 | 0-7 | 8-15 | 8-15 at chunks 2k | 2k+1 | 2k | 2k+1. V (B, transposed,
  // two n-tiles of head dims): keys 0-7 | 8-15 | 0-7 | 8-15 at chunks 2d | 2d | 2d+1 | 2d+1.
  const uint32_t q_fragment_offset = M::offset(warp_row + (lane & 15), lane >> 4);
  const uint32_t k_fragment_offset = M::offset((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
  const uint32_t v_fragment_offset = M::offset((lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4);
  constexpr int kQFragments = M::kQInRegisters ? kHeadDim / 16 : 1;
  uint32_t q_frag[kQFragments][4];
  cp_async_wait<1>();  // Q has landed (the first K/V tile may not have)
  __syncthreads();
  if constexpr (M::kQInRegisters) {
#pragma unroll
    for (int k = 0; k < kHeadDim / 16; ++k) ldmatrix_x4(q_frag[k], s_q + (q_fragment_offset ^ (k * 32)));
  }

  for (int j = 0; j < num_kv_tiles; ++j) {
    // Into the stage read in iteration j - 1, released by its closing barrier.
    if (j + 1 < num_kv_tiles) copy_kv(j + 1);
    cp_async_commit();
    cp_async_wait<1>();  // tile j has landed
    __syncthreads();     // ... for every thread; and every copy_kv so far has read its rows_s
    write_rows(j + 2);   // over tile j's offsets; read by copy_kv(j + 2) after the closing barrier
    read_block(j + 3);
    const uint32_t k_stage = s_k + (j & 1) * M::kTileBytes;
    const uint32_t v_stage = s_v + (j & 1) * M::kTileBytes;

    // S = Q K^T: per 16 keys one ldmatrix.x4 gives the B fragments of two n-tiles.
    float s[kBlockN / 8][4];
#pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int k = 0; k < kHeadDim / 16; ++k) {
      uint32_t qa[4];
      if constexpr (M::kQInRegisters) {
#pragma unroll
        for (int r = 0; r < 4; ++r) qa[r] = q_frag[k][r];
      } else {
        ldmatrix_x4(qa, s_q + (q_fragment_offset ^ (k * 32)));
      }
#pragma unroll
      for (int n = 0; n < kBlockN / 16; ++n) {
        uint32_t kb[4];
        ldmatrix_x4(kb, k_stage + (k_fragment_offset ^ (k * 32)) + n * 16 * M::kRowBytes);
        mma_16816<T>(s[2 * n], qa, kb[0], kb[1]);
        mma_16816<T>(s[2 * n + 1], qa, kb[2], kb[3]);
      }
    }

    // Scale into log2 units, mask keys past each row's position (only tiles crossing the diagonal
    // of the CTA's first row), and update the online softmax; -inf maxima use base 0, so a row
    // with no key yet gets zeros, never NaN.
    const int key0 = j * kBlockN + 2 * (lane & 3);
    const bool crosses_diagonal = j * kBlockN + kBlockN - 1 > first_position + m0;
    float tile_max[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + n * 8 + (e & 1), position = position0 + (e >> 1) * 8;
        float x = s[n][e] * scale_log2;
        if (crosses_diagonal && key > position) x = -INFINITY;
        s[n][e] = x;
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], x);
      }
    }
    float alpha[2], base[2], tile_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // the 4 threads of a quad share a row
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
      base[h] = tile_max[h] == -INFINITY ? 0.f : tile_max[h];
      alpha[h] = exp2_approx(row_max[h] - base[h]);
      row_max[h] = tile_max[h];
    }
#pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2_approx(s[n][e] - base[e >> 1]);
        s[n][e] = p;
        tile_sum[e >> 1] += p;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) row_sum[h] = row_sum[h] * alpha[h] + tile_sum[h];
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; ++n) {
      o[n][0] *= alpha[0], o[n][1] *= alpha[0];
      o[n][2] *= alpha[1], o[n][3] *= alpha[1];
    }

    // O += P V: the C fragments of n-tiles 2k and 2k + 1 are the A fragment of key step k.
#pragma unroll
    for (int k = 0; k < kBlockN / 16; ++k) {
      const uint32_t pa[4] = {pack2<T>(s[2 * k][0], s[2 * k][1]), pack2<T>(s[2 * k][2], s[2 * k][3]),
                              pack2<T>(s[2 * k + 1][0], s[2 * k + 1][1]), pack2<T>(s[2 * k + 1][2], s[2 * k + 1][3])};
#pragma unroll
      for (int d = 0; d < kHeadDim / 16; ++d) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, v_stage + (v_fragment_offset ^ (d * 32)) + k * 16 * M::kRowBytes);
        mma_16816<T>(o[2 * d], pa, vb[0], vb[1]);
        mma_16816<T>(o[2 * d + 1], pa, vb[2], vb[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before iteration j + 1 refills it
  }
  cp_async_wait<0>();  // only empty groups remain; leave none in flight

  // Normalise, stage the warp's 16 rows in its own (no longer read) rows of Q, then store them
  // 16 bytes per thread.
  float inv_sum[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = row_sum[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    inv_sum[h] = sum > 0.f ? 1.f / sum : 0.f;
  }
  const int row_g = warp_row + lane / 4;
#pragma unroll
  for (int n = 0; n < kHeadDim / 8; ++n) {
    *reinterpret_cast<uint32_t*>(smem + M::offset(row_g, n) + (lane & 3) * 4) =
        pack2<T>(o[n][0] * inv_sum[0], o[n][1] * inv_sum[0]);
    *reinterpret_cast<uint32_t*>(smem + M::offset(row_g + 8, n) + (lane & 3) * 4) =
        pack2<T>(o[n][2] * inv_sum[1], o[n][3] * inv_sum[1]);
  }
  __syncwarp();
  T* out = a.out + int64_t(head) * a.out_head_stride;
#pragma unroll
  for (int i = 0; i < 16 * kChunks / 32; ++i) {
    const int index = i * 32 + lane;
    const int r = warp_row + index / kChunks, chunk = index % kChunks;
    if (m0 + r < q_len) {
      *reinterpret_cast<uint4*>(out + int64_t(q_start + m0 + r) * a.out_token_stride + chunk * 8) =
          *reinterpret_cast<const uint4*>(smem + M::offset(r, chunk));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Simple kernel: a warp per (new token, head). Lane l scores key k0 + l of each 32-key step
// against the query (in shared memory, in acc_t<T>), the warp updates the online softmax, and lane
// l accumulates output dims l, l + 32, ...

inline constexpr int kPrefillSimpleWarps = 4;  // heads per CTA

/// 1 / x, correctly rounded, inline (a plain division calls a slow-path subroutine).
__device__ __forceinline__ float reciprocal(float x) { return __frcp_rn(x); }
__device__ __forceinline__ double reciprocal(double x) { return __drcp_rn(x); }

template <typename T>
__global__ void __launch_bounds__(kPrefillSimpleWarps * 32)
    paged_attention_prefill_simple_kernel(const PrefillArgs<T> a) {
  using A = acc_t<T>;
  constexpr int kDimsPerLane = kPrefillMaxHeadDim / 32;
  __shared__ A query_s[kPrefillSimpleWarps][kPrefillMaxHeadDim];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int head = blockIdx.y * kPrefillSimpleWarps + warp;
  if (head >= a.num_heads) return;  // no block-wide barrier below
  const int token = blockIdx.x, dim = a.head_dim;

  int lo = 0, hi = a.num_seqs - 1;  // the last sequence starting at or before token
  while (lo < hi) {
    const int mid = lo + (hi - lo + 1) / 2;
    if (a.cu_seqlens_q[mid] <= token) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int seq = lo;
  const int q_start = a.cu_seqlens_q[seq], q_len = a.cu_seqlens_q[seq + 1] - q_start;
  const int context_len = a.context_lens[seq];
  const int num_keys = max(0, min(context_len, context_len - q_len + (token - q_start) + 1));
  const int32_t* table = a.block_tables + int64_t(seq) * a.max_blocks;
  const int64_t kv_row_stride = int64_t(a.num_kv_heads) * dim;
  const int64_t kv_head_offset = int64_t(head / (a.num_heads / a.num_kv_heads)) * dim;

  A* q = query_s[warp];
  const T* q_in = a.query + int64_t(token) * a.q_token_stride + int64_t(head) * a.q_head_stride;
  const A scale = static_cast<A>(a.scale);
  for (int d = lane; d < dim; d += 32) q[d] = to_acc(q_in[d]) * scale;
  __syncwarp();

  A o[kDimsPerLane];
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) o[i] = A(0);
  A running_max = -INFINITY, running_sum = A(0);
  for (int k0 = 0; k0 < num_keys; k0 += 32) {
    const int key = k0 + lane;
    int64_t row = 0;  // element offset of the key's row in either cache
    A score = -INFINITY;
    if (key < num_keys && key / a.block_size < a.max_blocks) {  // never past the table row
      const int32_t block = table[key / a.block_size];
      if (block >= 0 && block < a.num_blocks) {
        row = (int64_t(block) * a.block_size + key % a.block_size) * kv_row_stride + kv_head_offset;
        const T* k = a.k_cache + row;
        A dot = A(0);
#pragma unroll 8
        for (int d = 0; d < dim; ++d) dot += q[d] * to_acc(k[d]);
        score = dot;
      }
    }
    const A step_max = max(running_max, warp_max(score));
    const A base = step_max == A(-INFINITY) ? A(0) : step_max;  // no NaN while every key is masked
    const A p = score == A(-INFINITY) ? A(0) : exp(score - base);
    const A alpha = exp(running_max - base);
    running_sum = running_sum * alpha + warp_sum(p);
    running_max = step_max;
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) o[i] *= alpha;
    const int step_keys = min(32, num_keys - k0);
    for (int j = 0; j < step_keys; ++j) {
      const A p_j = __shfl_sync(0xffffffffu, p, j);
      const int64_t row_j = __shfl_sync(0xffffffffu, row, j);
      if (p_j == A(0)) continue;  // warp-uniform; a skipped key (bad block id) has no row to read
      const T* v = a.v_cache + row_j;
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < dim) o[i] += p_j * to_acc(v[d]);
      }
    }
  }
  const A inv_sum = running_sum > A(0) ? reciprocal(running_sum) : A(0);
  T* out = a.out + int64_t(token) * a.out_token_stride + int64_t(head) * a.out_head_stride;
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < dim) out[d] = from_acc<T>(o[i] * inv_sum);
  }
}

// ---------------------------------------------------------------------------------------------
// Launcher.

template <typename T, int kHeadDim>
cudaError_t launch_prefill_mma(const PrefillArgs<T>& a, cudaStream_t stream) {
  using M = PrefillMma<T, kHeadDim>;
  const auto kernel = paged_attention_prefill_mma_kernel<T, kHeadDim>;
  if constexpr (M::kSmemBytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, M::kSmemBytes);
    if (err != cudaSuccess) return err;
  }
  const int64_t num_slots = prefill_num_slots(a.num_tokens, a.num_seqs, M::kBlockM);
  const dim3 grid(static_cast<unsigned>(num_slots), static_cast<unsigned>(a.num_heads));
  const int block_shift = __builtin_ctz(static_cast<unsigned>(a.block_size));  // a power of two
  kernel<<<grid, M::kThreads, M::kSmemBytes, stream>>>(a, num_slots, block_shift);
  return cudaGetLastError();
}

/// Whether the tensor-core kernel may run: a half type, an instantiated head_dim, a power-of-two
/// block_size (pages found by shifts), and 16-byte aligned rows and heads (cp.async and the output
/// stores move 16 bytes).
template <typename T>
bool prefill_takes_mma(const PrefillArgs<T>& a) {
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
    const int d = a.head_dim;
    return (d == 64 || d == 128 || d == 256) && (a.block_size & (a.block_size - 1)) == 0 &&
           aligned16(a.query, d, a.q_token_stride) &&
           aligned16(a.query, d, a.q_head_stride) && aligned16(a.out, d, a.out_token_stride) &&
           aligned16(a.out, d, a.out_head_stride) && aligned16(a.k_cache, d) && aligned16(a.v_cache, d);
  } else {
    return false;
  }
}

/// Writes out for every new token; returns the launch's error. Reads no index on the host.
template <typename T>
cudaError_t paged_attention_prefill(const PrefillArgs<T>& a, cudaStream_t stream) {
  if (a.head_dim > kPrefillMaxHeadDim || a.num_kv_heads <= 0 || a.num_heads > 65535) return cudaErrorInvalidValue;
  if (a.num_tokens == 0 || a.num_seqs == 0 || a.num_heads == 0 || a.head_dim == 0) return cudaSuccess;
  if (a.block_size <= 0) return cudaErrorInvalidValue;
  if (prefill_takes_mma(a)) {
    if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
      switch (a.head_dim) {
        case 64: return launch_prefill_mma<T, 64>(a, stream);
        case 128: return launch_prefill_mma<T, 128>(a, stream);
        case 256: return launch_prefill_mma<T, 256>(a, stream);
        default: break;
      }
    }
  }
  const dim3 grid(static_cast<unsigned>(a.num_tokens),
                  static_cast<unsigned>(ceil_div(a.num_heads, kPrefillSimpleWarps)));
  paged_attention_prefill_simple_kernel<T><<<grid, kPrefillSimpleWarps * 32, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace pnl::kernels::cuda
