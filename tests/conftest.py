import sys
from pathlib import Path

import pytest
import torch

import fused_opt

# The references and the tolerance table are imported as plain modules by every test file.
sys.path.insert(0, str(Path(__file__).parent))

CUDA_KERNELS = torch.cuda.is_available() and fused_opt.built_with_cuda()


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(
                not CUDA_KERNELS,
                reason="needs a CUDA GPU and fused_opt built with its CUDA kernels "
                f"(cuda available: {torch.cuda.is_available()}, "
                f"CUDA kernels: {fused_opt.built_with_cuda()})",
            ),
        ),
    ]
)
def device(request) -> str:
    """The device a device-parametrized test puts its params on: every test that takes it runs
    on the CPU kernels, and on the CUDA kernels where they are built and a GPU is present."""
    return request.param
