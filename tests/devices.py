"""The devices the tests run the kernels on: always the CPU, and CUDA where a GPU is present and
fused_opt was built with its CUDA kernels."""

import pytest
import torch

import fused_opt

CUDA_KERNELS = torch.cuda.is_available() and fused_opt.built_with_cuda()

requires_cuda_kernels = pytest.mark.skipif(
    not CUDA_KERNELS,
    reason="needs a CUDA GPU and fused_opt built with its CUDA kernels "
    f"(cuda available: {torch.cuda.is_available()}, CUDA kernels: {fused_opt.built_with_cuda()})",
)

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda_kernels)]
