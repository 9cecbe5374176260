// sample_tokens on the CPU: the token of a row, drawn by the Gumbel-max trick. Torch-free; T is
// float, double, c10::Half or c10::BFloat16, and scores are in Acc = acc_t<T>.
//
// argmax_i logit_i / temperature + g_i, with g_i = -log(-log(u_i)) and u_i uniform
// (sample_noise.h), picks token i with probability softmax(logits / temperature)_i: one pass over
// the row, with no softmax and no sort. Temperature 0 takes the argmax, the first one on ties.
#pragma once

#include <cstdint>
#include <limits>

#include "pnl/kernels/cpu/common.h"
#include "pnl/kernels/sample_noise.h"

namespace pnl::kernels::cpu {
inline namespace PNL_CPU_ISA {

/// The best score over a range of a row's tokens, and the first token that reached it; token -1
/// where no score beat -inf (every logit -inf or NaN).
template <typename Acc>
struct Candidate {
  Acc score = -std::numeric_limits<Acc>::infinity();
  int64_t token = -1;

  /// Keeps the better of the two, on a tie the lower token, so ranges merge in any order.
  void merge(const Candidate& other) {
    if (other.token < 0) return;
    if (token < 0 || other.score > score || (other.score == score && other.token < token)) *this = other;
  }
};

/// The winner among tokens [begin, end) of one row: logit / temperature + Gumbel noise from the
/// row's key, or the plain logit when greedy. kLanes partial winners keep the loop vectorised.
template <typename T>
Candidate<acc_t<T>> sample_range(const T* __restrict logits,  // [vocab], the row
                                 int64_t begin, int64_t end, bool greedy, acc_t<T> inv_temperature,
                                 uint64_t key) {
  using Acc = acc_t<T>;
  Acc best[kLanes];
  int32_t at[kLanes];
  for (int l = 0; l < kLanes; ++l) best[l] = -std::numeric_limits<Acc>::infinity(), at[l] = -1;
  const auto score = [&](int64_t i) {
    const Acc logit = static_cast<Acc>(logits[i]);
    if (greedy) return logit;
    const Acc u = bits_to_uniform(sample_bits(key, static_cast<uint32_t>(i)));
    return logit * inv_temperature - log_approx(-log_approx(u));
  };
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const Acc s = score(i + l);
      const bool better = s > best[l];
      best[l] = better ? s : best[l];
      at[l] = better ? static_cast<int32_t>(i + l) : at[l];
    }
  }
  Candidate<Acc> winner;
  for (; i < end; ++i) {  // the tail, by the lanes' rule: a token must beat the best before it
    const Acc s = score(i);
    if (s > winner.score) winner = {s, i};
  }
  for (int l = 0; l < kLanes; ++l) winner.merge({best[l], at[l]});
  return winner;
}

}  // namespace PNL_CPU_ISA
}  // namespace pnl::kernels::cpu
