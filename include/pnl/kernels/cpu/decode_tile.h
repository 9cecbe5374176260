// Decode attention for small GQA groups on the CPU. Torch-free; T is float, double, c10::Half or
// c10::BFloat16, and all arithmetic is in Acc = acc_t<T>.
//
// A decoding sequence has one query token, so a KV head serves only its G query heads (G = 1..8,
// e.g. 3 for SmolLM2, 2 for Qwen3-0.6B). AttentionTile lays rows side by side in the SIMD lanes,
// which leaves most lanes empty for so few rows; here the lanes run along head_dim instead: each
// key costs head_dim / kLanes loads, G x head_dim / kLanes FMAs and G horizontal sums, not a
// broadcast and an FMA per dim. Scores and the online softmax then run along the keys.
//
// One tile takes every head of its sequence, so it reads each cached token as the one contiguous
// [num_kv_heads, head_dim] row it is (per KV head, the reads would be strided: measured 1.6x slower).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "pnl/kernels/cpu/common.h"
#include "pnl/kernels/cpu/paged_attention.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace pnl::kernels::cpu {
inline namespace PNL_CPU_ISA {

/// Largest GQA group of the head_dim-vectorised path; larger groups fill AttentionTile's lanes.
inline constexpr int kMaxDecodeGroup = 8;

/// lanes [0, N/2) + lanes [N/2, N) of v.
template <int N, typename V, int... I>
inline auto halves(const V& v, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(v, v, I...) + __builtin_shufflevector(v, v, (I + N / 2)...);
}

/// The sum of v's N lanes, halving the vector each step (log2 N adds of narrower vectors). The
/// halves are shuffles, not memory copies, so no value goes through a store-forwarding stall.
template <typename Acc, int N>
inline Acc horizontal_sum(const Vec<Acc, N>& v) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    return horizontal_sum<Acc, N / 2>(halves<N>(v, std::make_integer_sequence<int, N / 2>{}));
  }
}

/// The K and V rows of the key tile after the current one, prefetched a row at a time while the
/// current tile's scores are computed. A sequence's blocks are scattered, which stops the hardware
/// prefetcher at every block edge. Issued in one burst, the prefetches fill the core's miss buffers
/// and stall it until the lines arrive; spread over the score loop, they overlap with its arithmetic.
/// 32 sequences over 30 layers' caches (which miss L3): 0.51 ms a layer, 0.69 with one burst per
/// tile, 0.77 with none.
class RowPrefetcher {
 public:
  /// Plans positions [begin, end) of kv, at most kKeyTile of them (none when end <= begin).
  template <typename T>
  void plan(const PagedKv<T>& kv, int64_t begin, int64_t end) {
    n_ = std::clamp<int64_t>(end - begin, 0, kKeyTile);
    kv.offsets(begin, n_, offsets_);
    for (int64_t j = 0; j < n_; ++j) offsets_[j] *= static_cast<int64_t>(sizeof(T));  // elements -> bytes
    k_ = reinterpret_cast<const char*>(kv.k_cache);
    v_ = reinterpret_cast<const char*>(kv.v_cache);
    row_bytes_ = kv.head_dim * static_cast<int64_t>(sizeof(T));
  }

  /// Prefetches row j of the planned tile (nothing past the tile's end).
  void row(int64_t j) const {
    if (j >= n_) return;
    const char* k = k_ + offsets_[j];
    const char* v = v_ + offsets_[j];
    for (int64_t b = 0; b < row_bytes_; b += 64) {  // one cache line each
      prefetch_l2(k + b);
      prefetch_l2(v + b);
    }
  }

 private:
  const char* k_ = nullptr;
  const char* v_ = nullptr;
  int64_t row_bytes_ = 0, n_ = 0;
  int64_t offsets_[kKeyTile];  // bytes
};

/// Every query head of one decoding sequence, G per KV head, over a range of its keys, with an
/// online softmax per head. Row r is query head r, of KV head r / G. Allocated once per thread.
template <typename Acc, int G>
class DecodeTile {
 public:
  static_assert(G >= 1 && G <= kMaxDecodeGroup, "DecodeTile takes groups of 1 to kMaxDecodeGroup heads");

  DecodeTile(int64_t num_kv_heads, int64_t head_dim)
      : kv_heads_(num_kv_heads),
        head_dim_(head_dim),
        rows_(G * num_kv_heads),
        q_(rows_ * head_dim),
        out_(rows_ * head_dim),
        max_(rows_),
        sum_(rows_),
        alpha_(rows_),
        scores_(rows_ * kKeyTile),
        k_buf_(kKeyTile * num_kv_heads * head_dim),
        v_buf_(kKeyTile * num_kv_heads * head_dim) {}

  /// The query heads attend to the keys [key_begin, key_end). `tokens` reads whole token rows: a
  /// PagedKv of one "head" [num_kv_heads * head_dim] wide.
  template <typename T>
  void attend(const PagedKv<T>& tokens,
              const T* query,  // [num_kv_heads * G, head_dim], heads q_head_stride apart
              int64_t q_head_stride, Acc scale, int64_t key_begin, int64_t key_end) {
    const int64_t dim = head_dim_;
    for (int64_t r = 0; r < rows_; ++r) {
      for (int64_t d = 0; d < dim; ++d) q_[r * dim + d] = static_cast<Acc>(query[r * q_head_stride + d]) * scale;
    }
    std::fill(max_.begin(), max_.end(), -std::numeric_limits<Acc>::infinity());
    std::fill(sum_.begin(), sum_.end(), Acc(0));
    std::fill(out_.begin(), out_.end(), Acc(0));
    for (int64_t k0 = key_begin; k0 < key_end; k0 += kKeyTile) {
      const int64_t n = std::min(kKeyTile, key_end - k0);
      gather(tokens, k0, n);
      next_.plan(tokens, k0 + kKeyTile, key_end);
      scores(n);
      softmax(n);
      accumulate(n);
    }
  }

  Acc row_max(int64_t r) const { return max_[r]; }
  Acc row_sum(int64_t r) const { return sum_[r]; }
  const Acc* row_out(int64_t r) const { return out_.data() + r * head_dim_; }  // [head_dim], not normalised

  /// out = the normalised output of query head r.
  template <typename T>
  void store_row(int64_t r, T* out) const {  // out [head_dim]
    store_normalised(out, row_out(r), sum_[r], head_dim_);
  }

 private:
  using V = Vec<Acc, kLanes>;

  /// Points k_rows_ / v_rows_ at the whole token rows [num_kv_heads * head_dim] of positions
  /// [k0, k0 + n).
  template <typename T>
  void gather(const PagedKv<T>& kv, int64_t k0, int64_t n) {
    gather_kv_rows(kv, k0, n, kv_heads_ * head_dim_, k_buf_.data(), v_buf_.data(), k_rows_, v_rows_);
  }

  /// scores_[r][j] = q_r . k_j, kLanes dims per FMA, one horizontal sum per head and key; each
  /// key also prefetches one key of the next tile.
  void scores(int64_t n) {
    const int64_t dim = head_dim_, vec_dim = dim / kLanes * kLanes;
    for (int64_t j = 0; j < n; ++j) {
      next_.row(j);
      for (int64_t h = 0; h < kv_heads_; ++h) {
        const Acc* __restrict k = k_rows_[j] + h * dim;
        const Acc* __restrict q = q_.data() + h * G * dim;
        V acc[G];
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) acc[g] = V{};
        for (int64_t d = 0; d < vec_dim; d += kLanes) {
          const V kd = load_vec<V>(k + d);
#pragma GCC unroll 8
          for (int g = 0; g < G; ++g) acc[g] += load_vec<V>(q + g * dim + d) * kd;
        }
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) {
          Acc s = horizontal_sum<Acc, kLanes>(acc[g]);
          for (int64_t d = vec_dim; d < dim; ++d) s += q[g * dim + d] * k[d];
          scores_[(h * G + g) * kKeyTile + j] = s;
        }
      }
    }
  }

  /// Online softmax over the tile's n keys: scores become exp(score - new max), and alpha_
  /// = exp(old max - new max) rescales the old sums (0 on a head's first keys). The max and the
  /// sum keep kLanes partial results (see common.h), so all three loops vectorise.
  void softmax(int64_t n) {
    constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
    for (int64_t r = 0; r < rows_; ++r) {
      Acc* __restrict s = scores_.data() + r * kKeyTile;
      Acc lane_max[kLanes];
      for (int l = 0; l < kLanes; ++l) lane_max[l] = kNegInf;
      int64_t j = 0;
      for (; j + kLanes <= n; j += kLanes) {
        for (int l = 0; l < kLanes; ++l) lane_max[l] = s[j + l] > lane_max[l] ? s[j + l] : lane_max[l];
      }
      for (; j < n; ++j) lane_max[0] = s[j] > lane_max[0] ? s[j] : lane_max[0];
      Acc new_max = max_[r];
      for (int l = 0; l < kLanes; ++l) new_max = lane_max[l] > new_max ? lane_max[l] : new_max;
      // 0 while the head has seen only -inf scores, so no -inf - -inf
      const Acc base = new_max == kNegInf ? Acc(0) : new_max;
      for (j = 0; j < n; ++j) s[j] = exp_approx(s[j] - base);
      Acc lane_sum[kLanes] = {};
      for (j = 0; j + kLanes <= n; j += kLanes) {
        for (int l = 0; l < kLanes; ++l) lane_sum[l] += s[j + l];
      }
      for (; j < n; ++j) lane_sum[0] += s[j];
      Acc total = 0;
      for (int l = 0; l < kLanes; ++l) total += lane_sum[l];
      alpha_[r] = exp_approx(max_[r] - base);  // exp(-inf) = 0 on the first tile
      sum_[r] = sum_[r] * alpha_[r] + total;
      max_[r] = new_max;
    }
  }

  /// out_r = out_r * alpha_r + sum_j p[r][j] v_j, per KV head in register tiles of its G heads x
  /// 2 (then 1) x kLanes dims, or 1 x kLanes where 2 G sums would not fit the registers with the
  /// V loads; the tail of head_dim one dim at a time.
  void accumulate(int64_t n) {
    constexpr int kWide = 2 * G + 3 <= kVectorRegisters ? 2 : 1;
    const int64_t dim = head_dim_;
    for (int64_t h = 0; h < kv_heads_; ++h) {
      int64_t d0 = 0;
      for (; d0 + kWide * kLanes <= dim; d0 += kWide * kLanes) accumulate_dims<kWide>(h, d0, n);
      for (; d0 + kLanes <= dim; d0 += kLanes) accumulate_dims<1>(h, d0, n);
      for (; d0 < dim; ++d0) {
        for (int64_t r = h * G; r < (h + 1) * G; ++r) {
          Acc x = out_[r * dim + d0] * alpha_[r];
          for (int64_t j = 0; j < n; ++j) x += scores_[r * kKeyTile + j] * v_rows_[j][h * dim + d0];
          out_[r * dim + d0] = x;
        }
      }
    }
  }

  template <int C>
  void accumulate_dims(int64_t h, int64_t d0, int64_t n) {
    const int64_t dim = head_dim_, r0 = h * G;
    Acc* __restrict out = out_.data() + r0 * dim + d0;
    const Acc* __restrict p = scores_.data() + r0 * kKeyTile;
    V o[G][C];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
#pragma GCC unroll 2
      for (int c = 0; c < C; ++c) o[g][c] = load_vec<V>(out + g * dim + c * kLanes) * alpha_[r0 + g];
    }
    for (int64_t j = 0; j < n; ++j) {
      const Acc* __restrict v_row = v_rows_[j] + h * dim + d0;
      V v[C];
#pragma GCC unroll 2
      for (int c = 0; c < C; ++c) v[c] = load_vec<V>(v_row + c * kLanes);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
#pragma GCC unroll 2
        for (int c = 0; c < C; ++c) o[g][c] += p[g * kKeyTile + j] * v[c];
      }
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
#pragma GCC unroll 2
      for (int c = 0; c < C; ++c) store_vec(out + g * dim + c * kLanes, o[g][c]);
    }
  }

  int64_t kv_heads_, head_dim_, rows_;
  std::vector<Acc> q_;            // [rows_, head_dim]: queries, scaled
  std::vector<Acc> out_;          // [rows_, head_dim]: unnormalised outputs
  std::vector<Acc> max_;          // [rows_]
  std::vector<Acc> sum_;          // [rows_]
  std::vector<Acc> alpha_;        // [rows_]: this tile's rescale of the old sums
  std::vector<Acc> scores_;       // [rows_, kKeyTile]: scores, then probabilities
  std::vector<Acc> k_buf_;        // [kKeyTile, num_kv_heads * head_dim]: converted K rows (T != Acc)
  std::vector<Acc> v_buf_;        // [kKeyTile, num_kv_heads * head_dim]: converted V rows (T != Acc)
  RowPrefetcher next_;            // the next key tile's K and V rows
  const Acc* k_rows_[kKeyTile];   // the tile's K token rows, [num_kv_heads * head_dim] each
  const Acc* v_rows_[kKeyTile];   // the tile's V token rows, [num_kv_heads * head_dim] each
};

}  // namespace PNL_CPU_ISA
}  // namespace pnl::kernels::cpu

#pragma GCC diagnostic pop
