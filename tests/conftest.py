import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The references, the tolerance table and the device list are imported as plain modules by every
# test file.
sys.path.insert(0, str(Path(__file__).parent))

import simt  # noqa: E402
from devices import DEVICES, requires_simt  # noqa: E402


@pytest.fixture(params=DEVICES)
def device(request) -> Iterator[str]:
    """The device a device-parametrized test puts its params on: every test that takes it runs
    on the CPU kernels; on the CUDA kernels emulated on the CPU ("simt": the optimizers call the
    emulation's ops, and the test sees the device "cpu"); and on a GPU where the CUDA kernels are
    built and one is present."""
    if request.param != "simt":
        yield request.param
        return
    with simt.emulated(simt.schedule_of(request.node.nodeid)):
        yield "cpu"


@pytest.fixture(params=["cpu", pytest.param("simt", marks=requires_simt)])
def kernels(request) -> Iterator[str]:
    """Which kernels the op calls of a test on CPU tensors run: fused_opt's CPU kernels, or its
    CUDA kernels emulated on the CPU ("simt")."""
    if request.param != "simt":
        yield request.param
        return
    with simt.emulated(simt.schedule_of(request.node.nodeid)):
        yield request.param
