// Every schema of the torch.ops.pnl namespace is declared here, in one place. The CPU and CUDA
// implementations register themselves from their own files with TORCH_LIBRARY_IMPL(pnl, ...).
#include <torch/library.h>

TORCH_LIBRARY(pnl, m) {}
