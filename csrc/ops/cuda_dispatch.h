// What every CUDA adapter needs: the torch dtype -> CUDA type switch, the device guard and stream,
// and a checked launch. Included from .cu files only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace pnl::ops {

/// Runs fn.template operator()<T>() with T the CUDA type of `dtype`: float, double, __half or
/// __nv_bfloat16 (same bits as c10::Half / c10::BFloat16).
template <typename Fn>
void dispatch_cuda_float(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn.template operator()<float>();
    case at::kDouble: return fn.template operator()<double>();
    case at::kHalf: return fn.template operator()<__half>();
    case at::kBFloat16: return fn.template operator()<__nv_bfloat16>();
    default: TORCH_CHECK(false, op, " on CUDA supports float32, float64, float16 and bfloat16, got ", dtype);
  }
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

/// Throws a RuntimeError naming the op if a kernel launch failed.
inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error ", cudaGetErrorString(err));
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace pnl::ops
