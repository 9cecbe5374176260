// y = x W^T + b on the CPU, over a weight packed in blocks of kLinearBlock output features.
// Torch-free; T is float, double, c10::Half or c10::BFloat16, and sums are in Acc = acc_t<T>.
//
// Packed layout: W [N, K] becomes [N / 16, K, 16], block b holding features [16 b, 16 b + 16)
// with, for each k, their 16 weights side by side (one zmm, two ymm or four xmm of fp32: the same
// layout serves every instruction set). A register tile of RM rows of x and RN blocks then runs
// along k as RN blocks of vector loads, RM broadcasts and RM x RN blocks of vector FMAs, with no
// horizontal sums; each block is read front to back, so one row (decoding) streams the weight at
// memory speed. The tile shapes of each instruction set are linear_cpu.cpp's, and the README's
// Benchmarks section has their measurements.
//
// Each tile also prefetches a share of the next panel of W that its thread will compute, spread
// over its k loop (SpreadPrefetch). Without it, a panel's first row tile streams the panel from
// DRAM faster than two cores' bandwidth allows while the later tiles read L2 and leave DRAM idle.
// Decode steps of several rows run faster with it; one row (one pass over W, which the hardware
// prefetcher follows) runs slower, so its tiles take none (linear_cpu.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "pnl/kernels/cpu/common.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace pnl::kernels::cpu {
inline namespace PNL_CPU_ISA {

/// Output features per packed block: 64 bytes of fp32, whatever the instruction set.
inline constexpr int64_t kLinearBlock = 16;

/// Acc lanes of one SIMD register, and registers per packed block: 16 and 1 on AVX-512, 8 and 2
/// on AVX2, 4 and 4 on SSE2 (for fp32; double, the float64 oracle's path, takes twice as many).
template <typename Acc>
inline constexpr int kAccLanes = kVectorBytes / static_cast<int>(sizeof(Acc));
template <typename Acc>
inline constexpr int kVecsPerBlock = kLinearBlock / kAccLanes<Acc>;

template <typename Acc>
using AccVec = Vec<Acc, kAccLanes<Acc>>;

/// One register of weights (or bias) at p, widened to Acc.
template <typename Acc, typename T>
inline AccVec<Acc> load_lanes(const T* __restrict p) {  // p [kAccLanes]
  if constexpr (std::is_same_v<T, Acc>) {
    return load_vec<AccVec<Acc>>(p);
  } else {
    AccVec<Acc> v;
    for (int l = 0; l < kAccLanes<Acc>; ++l) v[l] = static_cast<Acc>(p[l]);
    return v;
  }
}

/// Asks a byte range into L2 a share per step of a loop: a few lines at a time, so the loads
/// overlap the loop's arithmetic instead of queueing behind each other in one burst.
class SpreadPrefetch {
 public:
  SpreadPrefetch(const void* begin, int64_t bytes, int64_t steps)
      : begin_(static_cast<const char*>(begin)), bytes_(bytes), per_step_((bytes + steps - 1) / steps) {}

  void step() {
    due_ += per_step_;
    for (; done_ < due_ && done_ < bytes_; done_ += 64) prefetch_l2(begin_ + done_);
  }

 private:
  const char* begin_;
  int64_t bytes_, per_step_, done_ = 0, due_ = 0;
};

/// A tile that prefetches nothing; its empty step() compiles away (a SpreadPrefetch of no bytes
/// still cost the one-row loops 5 %).
struct NoPrefetch {
  void step() {}
};

/// y[RM, RN * 16] = x[RM, k] W^T (+ bias) for RN consecutive packed blocks starting at w.
/// The RM x RN x kVecsPerBlock sums live in registers, which the caller's tile shape must fit with
/// one block row of weights (linear_cpu.cpp).
template <typename T, int RM, int RN, typename Prefetch>
inline void linear_tile(T* __restrict y, int64_t y_stride,        // [RM, RN * 16], rows y_stride apart
                        const T* __restrict x, int64_t x_stride,  // [RM, k], rows x_stride apart
                        const T* __restrict w,                    // [RN, k, 16]: packed blocks
                        const T* __restrict bias,                 // [RN * 16], or null
                        int64_t k, Prefetch prefetch) {
  using Acc = acc_t<T>;
  using V = AccVec<Acc>;
  constexpr int L = kAccLanes<Acc>;
  constexpr int C = RN * kVecsPerBlock<Acc>;  // registers across the tile's 16 RN features
  V acc[RM][C];
#pragma GCC unroll 8
  for (int i = 0; i < RM; ++i) {
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) acc[i][c] = V{};
  }
  const int64_t block_stride = k * kLinearBlock;
  for (int64_t kk = 0; kk < k; ++kk) {
    prefetch.step();
    V wv[C];
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {  // register c: part c % kVecsPerBlock of block c / kVecsPerBlock
      const T* block_row = w + c / kVecsPerBlock<Acc> * block_stride + kk * kLinearBlock;
      wv[c] = load_lanes<Acc>(block_row + c % kVecsPerBlock<Acc> * L);
    }
#pragma GCC unroll 8
    for (int i = 0; i < RM; ++i) {
      const Acc xi = static_cast<Acc>(x[i * x_stride + kk]);
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) acc[i][c] += xi * wv[c];
    }
  }
#pragma GCC unroll 16
  for (int c = 0; c < C; ++c) {
    const V b = bias == nullptr ? V{} : load_lanes<Acc>(bias + c * L);
#pragma GCC unroll 8
    for (int i = 0; i < RM; ++i) {
      const V out = acc[i][c] + b;
      T* __restrict dst = y + i * y_stride + c * L;
      if constexpr (std::is_same_v<T, Acc>) {
        store_vec(dst, out);
      } else {
        for (int l = 0; l < L; ++l) dst[l] = static_cast<T>(out[l]);
      }
    }
  }
}

/// One register tile of `rows` (<= R) rows: the tile of exactly that height.
template <typename T, int R, int RN, typename Prefetch>
inline void linear_tile_up_to(T* y, int64_t y_stride, const T* x, int64_t x_stride, const T* w, const T* bias,
                              int64_t k, int64_t rows, Prefetch prefetch) {
  if constexpr (R >= 1) {
    if (rows == R) {
      linear_tile<T, R, RN>(y, y_stride, x, x_stride, w, bias, k, prefetch);
    } else {
      linear_tile_up_to<T, R - 1, RN>(y, y_stride, x, x_stride, w, bias, k, rows, prefetch);
    }
  }
}

/// All `rows` rows of x against RN blocks, in as few tiles of at most RM rows as fit them, their
/// heights differing by at most one (9 rows on 8-row tiles are 5 + 4, not 8 + a thin 1); tile t
/// prefetches prefetch_for(t).
template <typename T, int RM, int RN, typename PrefetchFor>
void linear_tiles(T* y, int64_t y_stride, const T* x, int64_t x_stride, const T* w, const T* bias, int64_t k,
                  int64_t rows, PrefetchFor prefetch_for) {
  const int64_t tiles = (rows + RM - 1) / RM;
  for (int64_t t = 0, i = 0; t < tiles; ++t) {
    const int64_t height = (rows - i) / (tiles - t);
    linear_tile_up_to<T, RM, RN>(y + i * y_stride, y_stride, x + i * x_stride, x_stride, w, bias, k, height,
                           prefetch_for(t));
    i += height;
  }
}

/// All `rows` rows of x against RN blocks. The tiles share the prefetch of next_bytes bytes at next
/// (the thread's next panel; none when null).
template <typename T, int RM, int RN>
void linear_rows(T* y, int64_t y_stride, const T* x, int64_t x_stride, const T* w, const T* bias, int64_t k,
                 int64_t rows, const T* next, int64_t next_bytes) {
  if (next == nullptr) {
    linear_tiles<T, RM, RN>(y, y_stride, x, x_stride, w, bias, k, rows, [](int64_t) { return NoPrefetch{}; });
    return;
  }
  const int64_t tiles = (rows + RM - 1) / RM;
  const int64_t share = round_up((next_bytes + tiles - 1) / tiles, 64);
  const char* next_at = reinterpret_cast<const char*>(next);
  linear_tiles<T, RM, RN>(y, y_stride, x, x_stride, w, bias, k, rows, [&](int64_t tile) {
    const int64_t begin = std::min(tile * share, next_bytes);
    return SpreadPrefetch(next_at + begin, std::min(share, next_bytes - begin), k);
  });
}

/// Blocks [b, b + RN) of the output for all rows of x.
template <typename T, int RM, int RN>
void linear_blocks(T* y, int64_t y_stride,        // [rows, num_blocks * 16]
                   const T* x, int64_t x_stride,  // [rows, k]
                   const T* w,                    // [num_blocks, k, 16]
                   const T* bias,                 // [num_blocks * 16], or null
                   int64_t k, int64_t rows, int64_t b, const T* next, int64_t next_bytes) {
  linear_rows<T, RM, RN>(y + b * kLinearBlock, y_stride, x, x_stride, w + b * k * kLinearBlock,
                         bias == nullptr ? nullptr : bias + b * kLinearBlock, k, rows, next, next_bytes);
}

/// Panel p of the output: blocks [p RN, p RN + RN), or the blocks left in the last panel one at a
/// time, for all rows of x. With prefetch_panel >= 0, the tiles also bring that panel of W into L2.
template <typename T, int RM, int RN>
void linear_panel(T* y, int64_t y_stride, const T* x, int64_t x_stride, const T* w, const T* bias, int64_t k,
                  int64_t rows, int64_t num_blocks, int64_t p, int64_t prefetch_panel) {
  const T* next = prefetch_panel < 0 ? nullptr : w + prefetch_panel * RN * k * kLinearBlock;
  const int64_t next_blocks = prefetch_panel < 0 ? 0 : std::min<int64_t>(RN, num_blocks - prefetch_panel * RN);
  const int64_t next_bytes = next_blocks * k * kLinearBlock * static_cast<int64_t>(sizeof(T));
  const int64_t b0 = p * RN;
  if (b0 + RN <= num_blocks) {
    linear_blocks<T, RM, RN>(y, y_stride, x, x_stride, w, bias, k, rows, b0, next, next_bytes);
    return;
  }
  for (int64_t b = b0; b < num_blocks; ++b) {
    linear_blocks<T, RM, 1>(y, y_stride, x, x_stride, w, bias, k, rows, b, nullptr, 0);
  }
}

}  // namespace PNL_CPU_ISA
}  // namespace pnl::kernels::cpu

#pragma GCC diagnostic pop
