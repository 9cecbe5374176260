// Argument checks shared by the op adapters: each failure is a clear RuntimeError in Python.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "pnl/kernels/rows.h"

namespace pnl::ops {

/// Elements of work per at::parallel_for chunk (torch's at::internal::GRAIN_SIZE): below it an op
/// stays on one thread, where waking the others would cost more than it saves.
inline constexpr int64_t kGrainSize = 32768;

/// An int32 index tensor (slot_mapping, cu_seqlens_q, context_lens, block_tables) of `dim` dims.
inline void check_index(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

/// A float tensor whose last dim is contiguous (rows may be strided).
inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a float tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1 && t.stride(-1) == 1, name, " must have a contiguous last dim, got strides ",
              t.strides());
}

inline void check_same(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), a_name, " and ", b_name, " must be on one device, got ", a.device(),
              " and ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), a_name, " and ", b_name, " must have one dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

/// An index tensor on the same device as the data tensor ref (a CPU kernel must not read CUDA memory).
inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " and ", ref_name, " must be on one device, got ", t.device(),
              " and ", ref.device());
}

using kernels::Rows;

/// The rows of a float tensor of 1 to 3 dims whose last dim is contiguous.
inline Rows rows_of(const at::Tensor& t, const char* name) {
  check_rows(t, name);
  TORCH_CHECK(t.dim() <= 3, name, " must have 1 to 3 dims, got shape ", t.sizes());
  Rows rows;
  if (t.dim() == 2) {
    rows.inner = t.size(0);
    rows.inner_stride = t.stride(0);
  } else if (t.dim() == 3) {
    rows.inner = t.size(1);
    rows.inner_stride = t.stride(1);
    rows.outer_stride = t.stride(0);
  }
  rows.count = t.numel() / std::max<int64_t>(t.size(-1), 1);
  rows.inner = std::max<int64_t>(rows.inner, 1);
  return rows;
}

}  // namespace pnl::ops
