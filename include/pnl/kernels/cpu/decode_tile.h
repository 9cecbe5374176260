// Decode attention for small GQA groups on the CPU. Torch-free; T is float, double, c10::Half or
// c10::BFloat16, and all arithmetic is in Acc = acc_t<T>.
//
// A decoding sequence has one query token, so a KV head serves only its G query heads (G = 1..8,
// e.g. 3 for SmolLM2, 2 for Qwen3-0.6B). AttentionTile lays rows side by side in the SIMD lanes,
// which leaves most lanes empty for so few rows; here the lanes run along head_dim instead: each
// key costs head_dim / kLanes loads, G x head_dim / kLanes FMAs and G horizontal sums, not a
// broadcast and an FMA per dim. Scores and the online softmax then run along the keys.
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

/// The G query heads of one KV head of one decoding sequence, over a range of its keys, with an
/// online softmax per head. Allocated once per thread and reused.
template <typename Acc, int G>
class DecodeTile {
 public:
  static_assert(G >= 1 && G <= kMaxDecodeGroup, "DecodeTile takes groups of 1 to kMaxDecodeGroup heads");

  /// group must be G; it is taken to match AttentionTile(max_rows, head_dim).
  DecodeTile([[maybe_unused]] int64_t group, int64_t head_dim)
      : head_dim_(head_dim),
        q_(G * head_dim),
        out_(G * head_dim),
        k_buf_(kKeyTile * head_dim),
        v_buf_(kKeyTile * head_dim) {}

  /// Head g of the group attends with query q (scaled here) to the keys [key_begin, key_end).
  template <typename T>
  void attend(const PagedKv<T>& kv,
              const T* query,  // [G, head_dim], heads q_head_stride apart
              int64_t q_head_stride, Acc scale, int64_t key_begin, int64_t key_end) {
    const int64_t dim = head_dim_;
    for (int g = 0; g < G; ++g) {
      for (int64_t d = 0; d < dim; ++d) q_[g * dim + d] = static_cast<Acc>(query[g * q_head_stride + d]) * scale;
      max_[g] = -std::numeric_limits<Acc>::infinity();
      sum_[g] = 0;
    }
    std::fill(out_.begin(), out_.end(), Acc(0));
    prefetch_kv(kv, key_begin, std::min(key_begin + kPrefetchTiles * kKeyTile, key_end));
    for (int64_t k0 = key_begin; k0 < key_end; k0 += kKeyTile) {
      const int64_t n = std::min(kKeyTile, key_end - k0);
      const int64_t ahead = k0 + kPrefetchTiles * kKeyTile;
      prefetch_kv(kv, ahead, std::min(ahead + kKeyTile, key_end));
      gather(kv, k0, n);
      scores(n);
      softmax(n);
      accumulate(n);
    }
  }

  Acc row_max(int64_t g) const { return max_[g]; }
  Acc row_sum(int64_t g) const { return sum_[g]; }
  const Acc* row_out(int64_t g) const { return out_.data() + g * head_dim_; }  // [head_dim], not normalised

  /// out = the normalised output of head g.
  template <typename T>
  void store_row(int64_t g, T* __restrict out) const {  // out [head_dim]
    const Acc inv_sum = sum_[g] > 0 ? Acc(1) / sum_[g] : Acc(0);
    const Acc* __restrict acc = row_out(g);
    for (int64_t d = 0; d < head_dim_; ++d) out[d] = static_cast<T>(acc[d] * inv_sum);
  }

 private:
  using V = Vec<Acc, kLanes>;

  /// Points k_rows_ / v_rows_ at the Acc rows of positions [k0, k0 + n): straight into the cache
  /// when T is Acc, else converted into k_buf_ / v_buf_.
  template <typename T>
  void gather(const PagedKv<T>& kv, int64_t k0, int64_t n) {
    const int64_t dim = head_dim_;
    int64_t offsets[kKeyTile];
    kv.offsets(k0, n, offsets);
    for (int64_t j = 0; j < n; ++j) {
      if constexpr (std::is_same_v<T, Acc>) {
        k_rows_[j] = kv.k_cache + offsets[j];
        v_rows_[j] = kv.v_cache + offsets[j];
      } else {
        const T* __restrict k = kv.k_cache + offsets[j];
        const T* __restrict v = kv.v_cache + offsets[j];
        Acc* __restrict k_acc = k_buf_.data() + j * dim;
        Acc* __restrict v_acc = v_buf_.data() + j * dim;
        for (int64_t d = 0; d < dim; ++d) k_acc[d] = static_cast<Acc>(k[d]);
        for (int64_t d = 0; d < dim; ++d) v_acc[d] = static_cast<Acc>(v[d]);
        k_rows_[j] = k_acc;
        v_rows_[j] = v_acc;
      }
    }
  }

  /// scores_[g][j] = q_g . k_j, kLanes dims per FMA, one horizontal sum per head and key.
  void scores(int64_t n) {
    const int64_t dim = head_dim_, vec_dim = dim / kLanes * kLanes;
    const Acc* __restrict q = q_.data();
    for (int64_t j = 0; j < n; ++j) {
      const Acc* __restrict k = k_rows_[j];
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
        scores_[g][j] = s;
      }
    }
  }

  /// Online softmax over the tile's n keys: scores become exp(score - new max), and alpha_
  /// = exp(old max - new max) rescales the old sums (0 on a head's first keys).
  void softmax(int64_t n) {
    for (int g = 0; g < G; ++g) {
      Acc* __restrict s = scores_[g];
      Acc new_max = max_[g];
      for (int64_t j = 0; j < n; ++j) new_max = s[j] > new_max ? s[j] : new_max;
      // 0 while the head has seen only -inf scores, so no -inf - -inf
      const Acc base = new_max == -std::numeric_limits<Acc>::infinity() ? Acc(0) : new_max;
      Acc total = 0;
      for (int64_t j = 0; j < n; ++j) {
        s[j] = exp_approx(s[j] - base);
        total += s[j];
      }
      alpha_[g] = exp_approx(max_[g] - base);  // exp(-inf) = 0 on the first tile
      sum_[g] = sum_[g] * alpha_[g] + total;
      max_[g] = new_max;
    }
  }

  /// out_g = out_g * alpha_g + sum_j p[g][j] v_j, in register tiles of G heads x 2 (then 1) x
  /// kLanes dims; the tail of head_dim one dim at a time.
  void accumulate(int64_t n) {
    const int64_t dim = head_dim_;
    int64_t d0 = 0;
    for (; d0 + 2 * kLanes <= dim; d0 += 2 * kLanes) accumulate_dims<2>(d0, n);
    for (; d0 + kLanes <= dim; d0 += kLanes) accumulate_dims<1>(d0, n);
    for (; d0 < dim; ++d0) {
      for (int g = 0; g < G; ++g) {
        Acc x = out_[g * dim + d0] * alpha_[g];
        for (int64_t j = 0; j < n; ++j) x += scores_[g][j] * v_rows_[j][d0];
        out_[g * dim + d0] = x;
      }
    }
  }

  template <int C>
  void accumulate_dims(int64_t d0, int64_t n) {
    const int64_t dim = head_dim_;
    V o[G][C];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
#pragma GCC unroll 2
      for (int c = 0; c < C; ++c) o[g][c] = load_vec<V>(out_.data() + g * dim + d0 + c * kLanes) * alpha_[g];
    }
    for (int64_t j = 0; j < n; ++j) {
      V v[C];
#pragma GCC unroll 2
      for (int c = 0; c < C; ++c) v[c] = load_vec<V>(v_rows_[j] + d0 + c * kLanes);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        const Acc p = scores_[g][j];
#pragma GCC unroll 2
        for (int c = 0; c < C; ++c) o[g][c] += p * v[c];
      }
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
#pragma GCC unroll 2
      for (int c = 0; c < C; ++c) store_vec(out_.data() + g * dim + d0 + c * kLanes, o[g][c]);
    }
  }

  int64_t head_dim_;
  std::vector<Acc> q_;            // [G, head_dim]: queries, scaled
  std::vector<Acc> out_;          // [G, head_dim]: unnormalised outputs
  std::vector<Acc> k_buf_;        // [kKeyTile, head_dim]: converted K rows (T != Acc)
  std::vector<Acc> v_buf_;        // [kKeyTile, head_dim]: converted V rows (T != Acc)
  Acc max_[G], sum_[G], alpha_[G];
  Acc scores_[G][kKeyTile];       // scores, then probabilities
  const Acc* k_rows_[kKeyTile];   // the tile's K rows, [head_dim] each
  const Acc* v_rows_[kKeyTile];   // the tile's V rows, [head_dim] each
};

/// Decode partition on a DecodeTile, as paged_attention_decode_partition on an AttentionTile: the
/// query token of a sequence over the key positions [key_begin, key_end) (every key of a decoding
/// token's context is visible, so context_len only matters to AttentionTile).
template <typename T, typename Acc, int G>
void paged_attention_decode_partition(DecodeTile<Acc, G>& tile,
                                      const T* query,  // [H, head_dim], heads q_head_stride apart
                                      int64_t q_head_stride, const PagedKv<T>& kv, int64_t /*group*/,
                                      int64_t /*context_len*/, int64_t key_begin, int64_t key_end, Acc scale) {
  tile.attend(kv, query + kv.kv_head * G * q_head_stride, q_head_stride, scale, key_begin, key_end);
}

}  // namespace pnl::kernels::cpu

#pragma GCC diagnostic pop
