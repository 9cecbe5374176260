// silu_and_mul on the GPU: one elementwise pass, 16-byte loads where rows are aligned. Torch-free.
#pragma once

#include "pnl/kernels/cuda/common.cuh"
#include "pnl/kernels/rows.h"

namespace pnl::kernels::cuda {

/// out[r, i] = silu(in[r, i]) * in[r, d + i]. grid (rows, column tiles); kVec elements per thread
/// per step (Vec16<T>::kSize when every row is 16-byte aligned, else 1).
template <typename T, int kVec>
__global__ void silu_and_mul_kernel(T* __restrict out,         // rows of [d]
                                    const T* __restrict in,    // rows of [2 * d]
                                    Rows out_rows, Rows in_rows, int64_t d) {
  using A = acc_t<T>;
  const int64_t r = blockIdx.x;
  const T* gate = in + in_rows.offset(r);
  const T* up = gate + d;
  T* y = out + out_rows.offset(r);
  const int64_t step = int64_t(gridDim.y) * blockDim.x * kVec;
  for (int64_t i = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * kVec; i < d; i += step) {
    if constexpr (kVec == 1) {
      const A x = to_acc(gate[i]);
      y[i] = from_acc<T>(x / (A(1) + exp(-x)) * to_acc(up[i]));
    } else {
      const Vec16<T> g = load16(gate + i), u = load16(up + i);
      Vec16<T> o;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const A x = to_acc(g.v[j]);
        o.v[j] = from_acc<T>(x / (A(1) + exp(-x)) * to_acc(u.v[j]));
      }
      store16(y + i, o);
    }
  }
}

template <typename T>
cudaError_t silu_and_mul(T* out, const T* in, Rows out_rows, Rows in_rows, int64_t d, cudaStream_t stream) {
  if (out_rows.count == 0 || d == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const bool vec = aligned16(in, d, in_rows.inner_stride) && aligned16(in, d, in_rows.outer_stride) &&
                   aligned16(out, d, out_rows.inner_stride) && aligned16(out, d, out_rows.outer_stride);
  const int per_thread = vec ? Vec16<T>::kSize : 1;
  // gridDim.y is at most 65535; the kernel's loop strides over the rest of a longer row.
  const int64_t tiles = ceil_div(d, int64_t(kThreads) * per_thread);
  const dim3 grid(static_cast<unsigned>(out_rows.count), static_cast<unsigned>(tiles < 65535 ? tiles : 65535));
  if (vec) {
    silu_and_mul_kernel<T, Vec16<T>::kSize><<<grid, kThreads, 0, stream>>>(out, in, out_rows, in_rows, d);
  } else {
    silu_and_mul_kernel<T, 1><<<grid, kThreads, 0, stream>>>(out, in, out_rows, in_rows, d);
  }
  return cudaGetLastError();
}

}  // namespace pnl::kernels::cuda
