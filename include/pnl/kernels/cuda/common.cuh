// Helpers shared by the CUDA kernels. Torch-free: T is float, double, __half or __nv_bfloat16.
// Arithmetic runs in acc_t<T> (fp32, fp64 for double, so tests can use a float64 oracle) and each
// output is rounded once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace pnl::kernels::cuda {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else {
    return x;
  }
}

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

/// 16 bytes of T: the widest load one thread issues (LDG.128).
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(T));
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ Vec16<T> load16(const T* p) {
  return *reinterpret_cast<const Vec16<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void store16(T* p, const Vec16<T>& x) {
  *reinterpret_cast<Vec16<T>*>(p) = x;
}

/// Whether every row of `row_len` elements at `stride` from `p` starts on a 16-byte boundary, so
/// the vectorized path may run.
template <typename T>
inline bool aligned16(const T* p, int64_t row_len, int64_t stride = 0) {
  constexpr int64_t n = 16 / sizeof(T);
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && row_len % n == 0 && stride % n == 0;
}

/// Loads kVec elements of T from p: one 16-byte load when kVec is Vec16<T>::kSize.
template <typename T, int kVec>
__device__ __forceinline__ void load_vec(T (&dst)[kVec], const T* p) {
  if constexpr (kVec == 1) {
    dst[0] = *p;
  } else {
    static_assert(kVec == Vec16<T>::kSize);
    const Vec16<T> v = load16(p);
#pragma unroll
    for (int j = 0; j < kVec; ++j) dst[j] = v.v[j];
  }
}

template <typename T, int kVec>
__device__ __forceinline__ void store_vec(T* p, const T (&src)[kVec]) {
  if constexpr (kVec == 1) {
    *p = src[0];
  } else {
    static_assert(kVec == Vec16<T>::kSize);
    Vec16<T> v;
#pragma unroll
    for (int j = 0; j < kVec; ++j) v.v[j] = src[j];
    store16(p, v);
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename A>
__device__ __forceinline__ A warp_max(A x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

/// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <typename A>
__device__ __forceinline__ A block_sum(A x) {
  __shared__ A partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  x = warp_sum(x);
  __syncthreads();  // `partial` may still be read by a previous call
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  x = lane < warps ? partial[lane] : A(0);
  return warp_sum(x);
}

/// Sum over `lanes` consecutive lanes of a warp (a power of two, at most 32). Every lane of the
/// warp must call it with the same `lanes`; each lane of a group gets the same bits.
template <typename A>
__device__ __forceinline__ A group_sum(A x, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

/// Threads of the per-token kernels: x over one token's items (up to 256), y over tokens, 256
/// threads in all.
inline dim3 token_block(int64_t items_per_token) {
  const int64_t x = items_per_token >= 256 ? 256 : (items_per_token + 31) / 32 * 32;
  return dim3(static_cast<unsigned>(x > 0 ? x : 32), static_cast<unsigned>(256 / (x > 0 ? x : 32)));
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace pnl::kernels::cuda
