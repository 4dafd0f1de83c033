"""The devices the tests run the kernels on: always the CPU kernels; the CUDA kernels through the
emulation tier (tests/simt.py) where the CUDA toolkit's headers are; and CUDA where a GPU is
present and fused_opt was built with its CUDA kernels."""

import pytest
import torch

import fused_opt
import simt

CUDA_KERNELS = torch.cuda.is_available() and fused_opt.built_with_cuda()

requires_cuda_kernels = pytest.mark.skipif(
    not CUDA_KERNELS,
    reason="needs a CUDA GPU and fused_opt built with its CUDA kernels "
    f"(cuda available: {torch.cuda.is_available()}, CUDA kernels: {fused_opt.built_with_cuda()})",
)

requires_simt = pytest.mark.skipif(
    simt.unavailable_reason() is not None,
    reason=f"the emulation tier cannot be built here: {simt.unavailable_reason()}",
)

#: "simt" runs the CUDA kernels' code on CPU tensors: tests see the device "cpu".
DEVICES = ["cpu", pytest.param("simt", marks=requires_simt),
           pytest.param("cuda", marks=requires_cuda_kernels)]
