// rms_norm and fused_add_rms_norm on the GPU: one pass over memory (the second sweep of a row
// re-reads what this thread just loaded, from L1), 16-byte loads where rows are aligned.
// Torch-free.
//
// A row is reduced by a group of lanes: a power of two up to 32 lanes of one warp for short rows
// (Qwen3's per-head q/k norm, head_dim 128), the whole block for long ones (hidden 4096). Every
// thread sweeps the same elements in both passes, so in-place use needs no barrier.
#pragma once

#include "pnl/kernels/cuda/common.cuh"
#include "pnl/kernels/rows.h"

namespace pnl::kernels::cuda {

/// 1 / sqrt(mean(x^2) + eps) from sum(x^2), as the CPU twin computes it (IEEE sqrt and division).
template <typename A>
__device__ __forceinline__ A inv_rms(A sum_of_squares, int64_t hidden, double eps) {
  return A(1) / sqrt(sum_of_squares / static_cast<A>(hidden) + static_cast<A>(eps));
}

/// x * inv_rms * weight, rounded once to T.
template <typename T>
__device__ __forceinline__ T normed(T x, acc_t<T> inv, T weight) {
  return from_acc<T>(to_acc(x) * inv * to_acc(weight));
}

/// Threads per block of the group-per-row kernels, and the longest row (in vectors) they take:
/// four sweeps of a 32-lane group.
constexpr int kNormThreads = 256;
constexpr int64_t kMaxGroupRowVectors = 128;

/// How rows map onto threads: `group` lanes per row (a power of two, at most 32) and
/// kNormThreads / group rows per block, or (group = 0) one block of `threads` per row.
struct NormLaunch {
  int group, threads;
  unsigned blocks;
};

inline NormLaunch norm_launch(int64_t rows, int64_t hidden, int per_thread) {
  const int64_t vectors = ceil_div(hidden, per_thread);
  if (vectors <= kMaxGroupRowVectors) {
    int group = 1;
    while (group < vectors && group < 32) group *= 2;
    return {group, kNormThreads, static_cast<unsigned>(ceil_div(rows, kNormThreads / group))};
  }
  const int threads = static_cast<int>(vectors >= 1024 ? 1024 : ceil_div(vectors, 32) * 32);
  return {0, threads, static_cast<unsigned>(rows)};
}

/// The row a thread works on and its lane within the row's group of `lanes` threads.
struct RowLane {
  int64_t row;
  int lane, lanes;
};

template <bool kBlockRow>
__device__ __forceinline__ RowLane row_lane(int group) {
  if constexpr (kBlockRow) {
    return {int64_t(blockIdx.x), int(threadIdx.x), int(blockDim.x)};
  } else {
    return {int64_t(blockIdx.x) * (blockDim.x / group) + threadIdx.x / group, int(threadIdx.x % group), group};
  }
}

template <bool kBlockRow, typename A>
__device__ __forceinline__ A row_sum(A x, int group) {
  if constexpr (kBlockRow) {
    return block_sum(x);
  } else {
    return group_sum(x, group);
  }
}

/// out[r] = in[r] / sqrt(mean(in[r]^2) + eps) * weight. kVec elements per thread per step
/// (Vec16<T>::kSize when every row and the weight are 16-byte aligned, else 1). out may be in.
template <typename T, int kVec, bool kBlockRow>
__global__ void rms_norm_kernel(T* out,                     // rows of [hidden]
                                const T* in,                // rows of [hidden]
                                const T* __restrict weight,  // [hidden]
                                Rows out_rows, Rows in_rows, int64_t hidden, double eps, int group) {
  using A = acc_t<T>;
  const RowLane at = row_lane<kBlockRow>(group);
  const bool valid = at.row < in_rows.count;  // a group past the last row still joins the reduction
  const T* x = in + (valid ? in_rows.offset(at.row) : 0);
  T* y = out + (valid ? out_rows.offset(at.row) : 0);
  const int64_t begin = valid ? int64_t(at.lane) * kVec : hidden;
  const int64_t step = int64_t(at.lanes) * kVec;

  A sum = 0;
  for (int64_t i = begin; i < hidden; i += step) {
    if constexpr (kVec == 1) {
      const A v = to_acc(x[i]);
      sum += v * v;
    } else {
      const Vec16<T> v = load16(x + i);
#pragma unroll
      for (int j = 0; j < kVec; ++j) sum += to_acc(v.v[j]) * to_acc(v.v[j]);
    }
  }
  const A inv = inv_rms(row_sum<kBlockRow>(sum, group), hidden, eps);
  for (int64_t i = begin; i < hidden; i += step) {
    if constexpr (kVec == 1) {
      y[i] = normed(x[i], inv, weight[i]);
    } else {
      const Vec16<T> v = load16(x + i), w = load16(weight + i);
      Vec16<T> o;
#pragma unroll
      for (int j = 0; j < kVec; ++j) o.v[j] = normed(v.v[j], inv, w.v[j]);
      store16(y + i, o);
    }
  }
}

/// residual[r] = x[r] + residual[r] (rounded to T); x[r] = rms_norm(residual[r]) * weight.
template <typename T, int kVec, bool kBlockRow>
__global__ void fused_add_rms_norm_kernel(T* __restrict x,             // rows of [hidden]
                                          T* __restrict residual,      // rows of [hidden]
                                          const T* __restrict weight,  // [hidden]
                                          Rows x_rows, Rows res_rows, int64_t hidden, double eps, int group) {
  using A = acc_t<T>;
  const RowLane at = row_lane<kBlockRow>(group);
  const bool valid = at.row < x_rows.count;
  T* xr = x + (valid ? x_rows.offset(at.row) : 0);
  T* rr = residual + (valid ? res_rows.offset(at.row) : 0);
  const int64_t begin = valid ? int64_t(at.lane) * kVec : hidden;
  const int64_t step = int64_t(at.lanes) * kVec;

  A sum = 0;
  for (int64_t i = begin; i < hidden; i += step) {
    if constexpr (kVec == 1) {
      const T r = from_acc<T>(to_acc(xr[i]) + to_acc(rr[i]));
      rr[i] = r;
      sum += to_acc(r) * to_acc(r);
    } else {
      const Vec16<T> a = load16(xr + i), b = load16(rr + i);
      Vec16<T> r;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        r.v[j] = from_acc<T>(to_acc(a.v[j]) + to_acc(b.v[j]));
        sum += to_acc(r.v[j]) * to_acc(r.v[j]);
      }
      store16(rr + i, r);
    }
  }
  const A inv = inv_rms(row_sum<kBlockRow>(sum, group), hidden, eps);
  for (int64_t i = begin; i < hidden; i += step) {  // reads back this thread's own residual stores
    if constexpr (kVec == 1) {
      xr[i] = normed(rr[i], inv, weight[i]);
    } else {
      const Vec16<T> r = load16(rr + i), w = load16(weight + i);
      Vec16<T> o;
#pragma unroll
      for (int j = 0; j < kVec; ++j) o.v[j] = normed(r.v[j], inv, w.v[j]);
      store16(xr + i, o);
    }
  }
}

template <typename T>
bool rows_aligned16(const T* p, const Rows& rows, int64_t row_len) {
  return aligned16(p, row_len, rows.inner_stride) && aligned16(p, row_len, rows.outer_stride);
}

/// Runs launch.template operator()<kVec, kBlockRow>() for the kernel variant that fits: 16-byte
/// vectors when `vec`, and a lane group per row (l.group > 0) or a whole block per row.
template <typename T, typename Launch>
void launch_norm_variant(bool vec, const NormLaunch& l, Launch&& launch) {
  constexpr int kV = Vec16<T>::kSize;
  if (vec) {
    l.group > 0 ? launch.template operator()<kV, false>() : launch.template operator()<kV, true>();
  } else {
    l.group > 0 ? launch.template operator()<1, false>() : launch.template operator()<1, true>();
  }
}

template <typename T>
cudaError_t rms_norm(T* out, const T* in, const T* weight, Rows out_rows, Rows in_rows, int64_t hidden, double eps,
                     cudaStream_t stream) {
  if (in_rows.count == 0 || hidden == 0) return cudaSuccess;
  const bool vec =
      rows_aligned16(in, in_rows, hidden) && rows_aligned16(out, out_rows, hidden) && aligned16(weight, hidden);
  const NormLaunch l = norm_launch(in_rows.count, hidden, vec ? Vec16<T>::kSize : 1);
  launch_norm_variant<T>(vec, l, [&]<int kVec, bool kBlockRow>() {
    rms_norm_kernel<T, kVec, kBlockRow>
        <<<l.blocks, l.threads, 0, stream>>>(out, in, weight, out_rows, in_rows, hidden, eps, l.group);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t fused_add_rms_norm(T* x, T* residual, const T* weight, Rows x_rows, Rows res_rows, int64_t hidden,
                               double eps, cudaStream_t stream) {
  if (x_rows.count == 0 || hidden == 0) return cudaSuccess;
  const bool vec =
      rows_aligned16(x, x_rows, hidden) && rows_aligned16(residual, res_rows, hidden) && aligned16(weight, hidden);
  const NormLaunch l = norm_launch(x_rows.count, hidden, vec ? Vec16<T>::kSize : 1);
  launch_norm_variant<T>(vec, l, [&]<int kVec, bool kBlockRow>() {
    fused_add_rms_norm_kernel<T, kVec, kBlockRow>
        <<<l.blocks, l.threads, 0, stream>>>(x, residual, weight, x_rows, res_rows, hidden, eps, l.group);
  });
  return cudaGetLastError();
}

}  // namespace pnl::kernels::cuda
