// Paged attention on the CPU. Torch-free; T is float, double, c10::Half or c10::BFloat16, and all
// arithmetic is in Acc = acc_t<T> (fp32, or fp64 for double).
//
// The K/V cache is [num_blocks, block_size, num_kv_heads, head_dim]; position pos of a sequence
// lives in block block_table[pos / block_size] at offset pos % block_size.
//
// The unit of work is a tile of query rows that share one KV head (the GQA group, times some
// tokens), streamed against the keys kKeyTile at a time with an online softmax: each row keeps its
// running max, the sum of exp(score - max) and its unnormalised output, rescaled when the max grows.
//
// Every inner loop runs over W query rows held side by side (queries transposed to [head_dim,
// rows], scores laid out [key, rows]), so scores, the softmax and its running state vectorise
// without a horizontal reduction, and K rows are read as they lie in the cache. The output
// accumulates [rows, head_dim], vectorised over head_dim. Small register tiles (W rows x
// kKeyBlock keys for scores, kRowBlock rows x 2 kLanes dims for the output) keep the sums in
// registers; they are written with GCC/Clang vector types (common.h), which pin that layout.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "pnl/kernels/cpu/common.h"

// Vec values wider than the target's registers (a portable build) go through memory; GCC's note
// that this ABI once changed (-Wpsabi) concerns calls across objects, and these are all inline.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace pnl::kernels::cpu {
inline namespace PNL_CPU_ISA {

/// Keys per tile of the online softmax.
inline constexpr int64_t kKeyTile = 32;
/// Keys per register tile of the score loop.
inline constexpr int64_t kKeyBlock = 8;
/// Query rows per register tile of the output loop.
inline constexpr int64_t kRowBlock = 4;
/// Rows side by side (AttentionTile's W) for tiles of many rows: one register of floats (at least
/// kRowBlock), so the kKeyBlock score sums fit the register file with room to spare.
inline constexpr int kWideRows = kLanes >= kRowBlock ? kLanes : kRowBlock;

/// Query tokens per prefill tile: the GQA group times as many tokens as keep the transposed
/// queries near 16 KiB of fp32, at least one token.
inline int64_t prefill_tokens_per_tile(int64_t group_size, int64_t head_dim) {
  return std::clamp<int64_t>(4096 / (group_size * head_dim), 1, 64);
}

/// One sequence's keys and values for one KV head, read through its block table.
template <typename T>
struct PagedKv {
  const T* k_cache;            // [num_blocks, block_size, num_kv_heads, head_dim], contiguous
  const T* v_cache;            // [num_blocks, block_size, num_kv_heads, head_dim], contiguous
  const int32_t* block_table;  // [ceil(context_len / block_size)] block ids of this sequence
  int64_t block_size;
  int64_t num_kv_heads;
  int64_t head_dim;
  int64_t kv_head;

  /// Element offsets of the [head_dim] rows of kv_head at positions [begin, begin + n), in either
  /// cache (one division per call, not per position).
  void offsets(int64_t begin, int64_t n, int64_t* __restrict out) const {
    if (n <= 0) return;  // and read no block_table entry past the context
    int64_t b = begin / block_size, within = begin % block_size;
    const int64_t token_stride = num_kv_heads * head_dim;
    const int64_t head_offset = kv_head * head_dim;
    int64_t row = (static_cast<int64_t>(block_table[b]) * block_size + within) * token_stride + head_offset;
    for (int64_t j = 0; j < n; ++j) {
      out[j] = row;
      row += token_stride;
      if (++within == block_size && j + 1 < n) {
        within = 0;
        row = static_cast<int64_t>(block_table[++b]) * block_size * token_stride + head_offset;
      }
    }
  }
};

/// Points k_rows / v_rows at the Acc rows [width] of positions [k0, k0 + n): straight into the
/// cache when T is Acc, else converted into k_buf / v_buf [kKeyTile, width].
template <typename Acc, typename T>
void gather_kv_rows(const PagedKv<T>& kv, int64_t k0, int64_t n, int64_t width, Acc* k_buf, Acc* v_buf,
                    const Acc** k_rows, const Acc** v_rows) {
  int64_t offsets[kKeyTile];
  kv.offsets(k0, n, offsets);
  for (int64_t j = 0; j < n; ++j) {
    if constexpr (std::is_same_v<T, Acc>) {
      k_rows[j] = kv.k_cache + offsets[j];
      v_rows[j] = kv.v_cache + offsets[j];
    } else {
      const T* __restrict k = kv.k_cache + offsets[j];
      const T* __restrict v = kv.v_cache + offsets[j];
      Acc* __restrict k_acc = k_buf + j * width;
      Acc* __restrict v_acc = v_buf + j * width;
      for (int64_t d = 0; d < width; ++d) k_acc[d] = static_cast<Acc>(k[d]);
      for (int64_t d = 0; d < width; ++d) v_acc[d] = static_cast<Acc>(v[d]);
      k_rows[j] = k_acc;
      v_rows[j] = v_acc;
    }
  }
}

/// out = acc / sum (0 where no key was seen): an online-softmax row's normalised output.
template <typename T, typename Acc>
void store_normalised(T* __restrict out, const Acc* __restrict acc, Acc sum, int64_t head_dim) {  // [head_dim]
  const Acc inv_sum = sum > 0 ? Acc(1) / sum : Acc(0);
  for (int64_t d = 0; d < head_dim; ++d) out[d] = static_cast<T>(acc[d] * inv_sum);
}

/// The working set of up to max_rows query rows of one KV head: transposed scaled queries,
/// online-softmax state, and one key tile's K/V rows and scores. W (kWideRows in use) is how many
/// rows sit side by side in the score and softmax loops: a prefill tile's tokens times its GQA
/// group, or a decoding token's group when that is above kMaxDecodeGroup (decode_tile.h takes the
/// smaller ones). Allocated once per thread and reused.
template <typename Acc, int W>
class AttentionTile {
 public:
  static_assert(W % kRowBlock == 0, "W must be a multiple of kRowBlock");

  AttentionTile(int64_t max_rows, int64_t head_dim)
      : head_dim_(head_dim),
        capacity_(round_up(max_rows, W)),
        q_t_(head_dim * capacity_),
        out_(capacity_ * head_dim),
        max_(capacity_),
        sum_(capacity_),
        alpha_(capacity_),
        key_end_(capacity_),
        valid_(capacity_),
        scores_(kKeyTile * capacity_),
        k_buf_(kKeyTile * head_dim),
        v_buf_(kKeyTile * head_dim),
        zeros_(head_dim) {}

  /// Starts `rows` (<= max_rows) empty rows; fill them with set_query.
  void reset(int64_t rows) {
    rows_ = rows;
    padded_ = round_up(rows, W);
    std::fill(q_t_.begin(), q_t_.begin() + head_dim_ * padded_, Acc(0));
    std::fill(out_.begin(), out_.begin() + padded_ * head_dim_, Acc(0));
    std::fill(max_.begin(), max_.begin() + padded_, -std::numeric_limits<Acc>::infinity());
    std::fill(sum_.begin(), sum_.begin() + padded_, Acc(0));
    std::fill(key_end_.begin(), key_end_.begin() + padded_, int64_t{0});  // padding rows see nothing
  }

  /// Row r's query q * scale, which may see the keys at positions [0, key_end).
  template <typename T>
  void set_query(int64_t r, const T* __restrict q, Acc scale, int64_t key_end) {  // q [head_dim]
    for (int64_t d = 0; d < head_dim_; ++d) q_t_[d * padded_ + r] = static_cast<Acc>(q[d]) * scale;
    key_end_[r] = key_end;
  }

  /// The rows attend to the keys at positions [key_begin, key_end), each row stopping at its own
  /// key_end.
  template <typename T>
  void attend(const PagedKv<T>& kv, int64_t key_begin, int64_t key_end) {
    for (int64_t k0 = key_begin; k0 < key_end; k0 += kKeyTile) {
      const int64_t n = std::min(kKeyTile, key_end - k0);
      gather(kv, k0, n);
      for (int64_t r = 0; r < padded_; ++r) valid_[r] = std::clamp<int64_t>(key_end_[r] - k0, 0, n);
      scores(round_up(n, kKeyBlock));
      softmax(n);
      accumulate(n);
    }
  }

  Acc row_max(int64_t r) const { return max_[r]; }
  Acc row_sum(int64_t r) const { return sum_[r]; }
  const Acc* row_out(int64_t r) const { return out_.data() + r * head_dim_; }  // [head_dim], not normalised

  /// out = the normalised output of row r.
  template <typename T>
  void store_row(int64_t r, T* out) const {  // out [head_dim]
    store_normalised(out, row_out(r), sum_[r], head_dim_);
  }

 private:
  /// Points k_rows_ / v_rows_ at the Acc rows of positions [k0, k0 + n): straight into the cache
  /// when T is Acc, else converted into k_buf_ / v_buf_. Rows up to the next kKeyBlock are zeros.
  template <typename T>
  void gather(const PagedKv<T>& kv, int64_t k0, int64_t n) {
    gather_kv_rows(kv, k0, n, head_dim_, k_buf_.data(), v_buf_.data(), k_rows_, v_rows_);
    for (int64_t j = n; j < round_up(n, kKeyBlock); ++j) k_rows_[j] = zeros_.data();
  }

  /// scores[j][r] = q_r . k_j for keys [0, n_padded): per register tile, W rows x kKeyBlock keys
  /// summed over head_dim, one broadcast key element times W query elements per step.
  void scores(int64_t n_padded) {
    using V = Vec<Acc, W>;
    const int64_t dim = head_dim_, stride = padded_;
    for (int64_t r0 = 0; r0 < padded_; r0 += W) {
      for (int64_t j0 = 0; j0 < n_padded; j0 += kKeyBlock) {
        const Acc* const* __restrict k = k_rows_ + j0;
        const Acc* __restrict q = q_t_.data() + r0;
        V s[kKeyBlock] = {};  // kKeyBlock independent FMA chains hide the FMA latency
        for (int64_t d = 0; d < dim; ++d) {
          const V q_d = load_vec<V>(q + d * stride);
          for (int64_t b = 0; b < kKeyBlock; ++b) s[b] += k[b][d] * q_d;
        }
        Acc* __restrict out = scores_.data() + j0 * stride + r0;
        for (int64_t b = 0; b < kKeyBlock; ++b) store_vec(out + b * stride, s[b]);
      }
    }
  }

  /// Online softmax over the tile's first n keys, W rows at a time: scores become probabilities
  /// exp(score - new max) (0 where masked), and alpha_ = exp(old max - new max) rescales the old sums.
  void softmax(int64_t n) {
    const Acc kNegInf = -std::numeric_limits<Acc>::infinity();
    const int64_t stride = padded_;
    for (int64_t r0 = 0; r0 < padded_; r0 += W) {
      const int64_t* __restrict valid = valid_.data() + r0;
      Acc new_max[W], total[W] = {};
      for (int l = 0; l < W; ++l) new_max[l] = max_[r0 + l];
      for (int64_t j = 0; j < n; ++j) {
        const Acc* __restrict s = scores_.data() + j * stride + r0;
        for (int l = 0; l < W; ++l) {
          const Acc x = j < valid[l] ? s[l] : kNegInf;
          new_max[l] = x > new_max[l] ? x : new_max[l];
        }
      }
      Acc base[W];  // new max, or 0 while a row has seen no key (so no -inf - -inf)
      for (int l = 0; l < W; ++l) base[l] = new_max[l] == kNegInf ? Acc(0) : new_max[l];
      for (int64_t j = 0; j < n; ++j) {
        Acc* __restrict s = scores_.data() + j * stride + r0;
        for (int l = 0; l < W; ++l) {
          const Acc p = j < valid[l] ? exp_approx(s[l] - base[l]) : Acc(0);
          s[l] = p;
          total[l] += p;
        }
      }
      for (int l = 0; l < W; ++l) {
        const Acc alpha = exp_approx(max_[r0 + l] - base[l]);  // 0 on a row's first keys
        alpha_[r0 + l] = alpha;
        sum_[r0 + l] = sum_[r0 + l] * alpha + total[l];
        max_[r0 + l] = new_max[l];
      }
    }
  }

  /// out_r = out_r * alpha_r + sum_j p[j][r] v_j for the tile's n keys, in register tiles of
  /// kRowBlock rows x 2 (then 1) x kLanes dims; the tail of head_dim one dim at a time.
  void accumulate(int64_t n) {
    const int64_t dim = head_dim_;
    for (int64_t r0 = 0; r0 < round_up(rows_, kRowBlock); r0 += kRowBlock) {
      int64_t d0 = 0;
      for (; d0 + 2 * kLanes <= dim; d0 += 2 * kLanes) accumulate_2x(r0, d0, n);
      for (; d0 + kLanes <= dim; d0 += kLanes) accumulate_1x(r0, d0, n);
      for (; d0 < dim; ++d0) {
        for (int64_t r = r0; r < r0 + kRowBlock; ++r) {
          Acc x = out_[r * dim + d0] * alpha_[r];
          for (int64_t j = 0; j < n; ++j) x += scores_[j * padded_ + r] * v_rows_[j][d0];
          out_[r * dim + d0] = x;
        }
      }
    }
  }

  // The register tiles of accumulate, rows [r0, r0 + 4) x dims [d0, d0 + 2 or 1 x kLanes). The
  // sums are named one by one: GCC keeps named vectors in registers, but spills arrays of them.
  void accumulate_2x(int64_t r0, int64_t d0, int64_t n) {
    using V = Vec<Acc, kLanes>;
    Acc* __restrict o = out_.data() + r0 * head_dim_ + d0;
    const int64_t dim = head_dim_, h = kLanes;
    const Acc al0 = alpha_[r0], al1 = alpha_[r0 + 1], al2 = alpha_[r0 + 2], al3 = alpha_[r0 + 3];
    V x00 = load_vec<V>(o) * al0, x01 = load_vec<V>(o + h) * al0;
    V x10 = load_vec<V>(o + dim) * al1, x11 = load_vec<V>(o + dim + h) * al1;
    V x20 = load_vec<V>(o + 2 * dim) * al2, x21 = load_vec<V>(o + 2 * dim + h) * al2;
    V x30 = load_vec<V>(o + 3 * dim) * al3, x31 = load_vec<V>(o + 3 * dim + h) * al3;
    const Acc* __restrict p = scores_.data() + r0;
    for (int64_t j = 0; j < n; ++j, p += padded_) {
      const V v0 = load_vec<V>(v_rows_[j] + d0), v1 = load_vec<V>(v_rows_[j] + d0 + h);
      x00 += p[0] * v0, x01 += p[0] * v1;
      x10 += p[1] * v0, x11 += p[1] * v1;
      x20 += p[2] * v0, x21 += p[2] * v1;
      x30 += p[3] * v0, x31 += p[3] * v1;
    }
    store_vec(o, x00), store_vec(o + h, x01);
    store_vec(o + dim, x10), store_vec(o + dim + h, x11);
    store_vec(o + 2 * dim, x20), store_vec(o + 2 * dim + h, x21);
    store_vec(o + 3 * dim, x30), store_vec(o + 3 * dim + h, x31);
  }

  void accumulate_1x(int64_t r0, int64_t d0, int64_t n) {
    using V = Vec<Acc, kLanes>;
    Acc* __restrict o = out_.data() + r0 * head_dim_ + d0;
    const int64_t dim = head_dim_;
    V x0 = load_vec<V>(o) * alpha_[r0], x1 = load_vec<V>(o + dim) * alpha_[r0 + 1];
    V x2 = load_vec<V>(o + 2 * dim) * alpha_[r0 + 2], x3 = load_vec<V>(o + 3 * dim) * alpha_[r0 + 3];
    const Acc* __restrict p = scores_.data() + r0;
    for (int64_t j = 0; j < n; ++j, p += padded_) {
      const V v = load_vec<V>(v_rows_[j] + d0);
      x0 += p[0] * v, x1 += p[1] * v, x2 += p[2] * v, x3 += p[3] * v;
    }
    store_vec(o, x0), store_vec(o + dim, x1), store_vec(o + 2 * dim, x2), store_vec(o + 3 * dim, x3);
  }

  int64_t head_dim_, capacity_, rows_ = 0, padded_ = 0;
  std::vector<Acc> q_t_;          // [head_dim, padded_]: queries, scaled, transposed
  std::vector<Acc> out_;          // [padded_, head_dim]: unnormalised outputs
  std::vector<Acc> max_;          // [padded_]
  std::vector<Acc> sum_;          // [padded_]
  std::vector<Acc> alpha_;        // [padded_]: this tile's rescale of the old sums
  std::vector<int64_t> key_end_;  // [padded_]: row r sees positions < key_end_[r]
  std::vector<int64_t> valid_;    // [padded_]: keys of the current tile row r sees
  std::vector<Acc> scores_;       // [kKeyTile, padded_]: scores, then probabilities
  std::vector<Acc> k_buf_;        // [kKeyTile, head_dim]: converted K rows (T != Acc)
  std::vector<Acc> v_buf_;        // [kKeyTile, head_dim]: converted V rows (T != Acc)
  std::vector<Acc> zeros_;        // [head_dim]: the K row of padding keys
  const Acc* k_rows_[kKeyTile];   // the tile's K rows, [head_dim] each
  const Acc* v_rows_[kKeyTile];   // the tile's V rows, [head_dim] each
};

/// Prefill tile: tokens [t0, t0 + num_tokens) of a sequence's q_len new tokens (the last q_len of
/// its context_len), for the `group` query heads of one KV head. New token i sits at position
/// context_len - q_len + i and sees positions 0..that one.
template <typename T, typename Acc, int W>
void paged_attention_prefill_tile(AttentionTile<Acc, W>& tile,
                                  T* out,  // [q_len, H, head_dim], rows out_stride apart, heads out_head_stride
                                  int64_t out_stride, int64_t out_head_stride,
                                  const T* query,  // [q_len, H, head_dim], rows q_stride apart, heads q_head_stride
                                  int64_t q_stride, int64_t q_head_stride, const PagedKv<T>& kv, int64_t group,
                                  int64_t q_len, int64_t context_len, int64_t t0, int64_t num_tokens, Acc scale) {
  const int64_t first_position = context_len - q_len;
  const int64_t head0 = kv.kv_head * group;
  tile.reset(num_tokens * group);
  for (int64_t i = 0; i < num_tokens; ++i) {
    for (int64_t g = 0; g < group; ++g) {
      tile.set_query(i * group + g, query + (t0 + i) * q_stride + (head0 + g) * q_head_stride, scale,
                     first_position + t0 + i + 1);
    }
  }
  tile.attend(kv, 0, first_position + t0 + num_tokens);
  for (int64_t i = 0; i < num_tokens; ++i) {
    for (int64_t g = 0; g < group; ++g) {
      tile.store_row(i * group + g, out + (t0 + i) * out_stride + (head0 + g) * out_head_stride);
    }
  }
}

/// Decode partition: the one query token of a sequence (its last position) over the key positions
/// [key_begin, key_end), for the `group` query heads of one KV head. The caller reads the result
/// with tile.store_row (one partition) or row_max / row_sum / row_out (to merge several).
template <typename T, typename Acc, int W>
void paged_attention_decode_partition(AttentionTile<Acc, W>& tile,
                                      const T* query,  // [H, head_dim], heads q_head_stride apart
                                      int64_t q_head_stride, const PagedKv<T>& kv, int64_t group,
                                      int64_t context_len, int64_t key_begin, int64_t key_end, Acc scale) {
  tile.reset(group);
  for (int64_t g = 0; g < group; ++g) {
    tile.set_query(g, query + (kv.kv_head * group + g) * q_head_stride, scale, context_len);
  }
  tile.attend(kv, key_begin, key_end);
}

/// Merges the partitions of one (sequence, head) by log-sum-exp: with M the largest max_p,
/// out = sum_p e^(max_p - M) out_p / sum_p e^(max_p - M) sum_p.
template <typename T, typename Acc>
void merge_partitions(T* __restrict out,            // [head_dim]
                      const Acc* __restrict maxes,  // [num_parts]
                      const Acc* __restrict sums,   // [num_parts]
                      const Acc* __restrict outs,   // [num_parts, head_dim], unnormalised
                      Acc* __restrict scratch,      // [head_dim]
                      int64_t num_parts, int64_t head_dim) {
  Acc global_max = -std::numeric_limits<Acc>::infinity();
  for (int64_t p = 0; p < num_parts; ++p) global_max = std::max(global_max, maxes[p]);
  Acc total = 0;
  for (int64_t d = 0; d < head_dim; ++d) scratch[d] = 0;
  for (int64_t p = 0; p < num_parts; ++p) {
    const Acc w = exp_approx(maxes[p] - global_max);
    total += w * sums[p];
    const Acc* __restrict part = outs + p * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) scratch[d] += w * part[d];
  }
  const Acc inv_total = total > 0 ? Acc(1) / total : Acc(0);
  for (int64_t d = 0; d < head_dim; ++d) out[d] = static_cast<T>(scratch[d] * inv_total);
}

}  // namespace PNL_CPU_ISA
}  // namespace pnl::kernels::cpu

#pragma GCC diagnostic pop
