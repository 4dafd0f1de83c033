#include <torch/library.h>

#include "cuda/ops_cuda.h"

TORCH_LIBRARY_IMPL(fused_opt, CUDA, m) { fused_opt::cuda::register_cuda_kernels(m); }
