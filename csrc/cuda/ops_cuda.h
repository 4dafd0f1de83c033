// The CUDA implementations of the ops, for the library that registers them: fused_opt's CUDA
// dispatch key (register_cuda.cpp) or the emulation tier's CPU-backed namespace (csrc/simt).
#pragma once

#include <torch/library.h>

namespace fused_opt::cuda {

void register_cuda_kernels(torch::Library& library);

}  // namespace fused_opt::cuda
