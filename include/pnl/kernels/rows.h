// Where the rows of a [hidden], [rows, hidden] or [outer, inner, hidden] tensor start, when the
// last dim is contiguous and the leading dims may be strided (e.g. a [T, H, D] view of a slice of
// qkv). Torch-free, and usable in CUDA kernels.
#pragma once

#include <cstdint>

#include "pnl/kernels/host_device.h"

namespace pnl::kernels {

struct Rows {
  int64_t count = 0;         // rows in all
  int64_t inner = 1;         // rows per step of the outer dim
  int64_t outer_stride = 0;  // elements
  int64_t inner_stride = 0;  // elements
  PNL_HOST_DEVICE int64_t offset(int64_t row) const {
    return (row / inner) * outer_stride + (row % inner) * inner_stride;
  }
};

}  // namespace pnl::kernels
