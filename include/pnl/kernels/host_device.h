// PNL_HOST_DEVICE: a function that CUDA kernels and host code both call. Torch-free.
#pragma once

#if defined(__CUDACC__)
#define PNL_HOST_DEVICE __host__ __device__
#else
#define PNL_HOST_DEVICE
#endif
