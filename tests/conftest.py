import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# The references, the tolerance table and the device list are imported as plain modules by every
# test file.
sys.path.insert(0, str(Path(__file__).parent))

import simt  # noqa: E402
from devices import DEVICES, requires_simt  # noqa: E402


# torch's CPU sqrt goes to MKL VML, which picks its kernel on the first call; when that first call
# runs on several threads at once, one thread's chunk can come from a low-accuracy kernel
# (pytorch/pytorch#188792: 2.8e-4 relative error on half of a tensor, in 7 to 10 of 40 fresh
# processes with 2 threads), and a torch.optim twin would then disagree with the references. One
# call on one element resolves it before any test runs.
for _dtype in (torch.float32, torch.float64):
    torch.ones(1, dtype=_dtype).sqrt()


# Marked slow, so that `-m "not slow"` gives a quick first run; the plain command runs them all.
# Each emulated ("simt") case runs whole CUDA launches as fibers; these take seconds each.
SLOW_TESTS = {
    "test_large_tensor_split_across_threads",
    "test_compiled_step_equals_eager_step",
    "test_ddp_and_zero_redundancy_train_like_torch",
    "test_command_line_entry_point",
    "test_readme_snippet_runs_verbatim",
}
SLOW_FILES = {"test_simt.py", "test_packaging.py", "test_trainers.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        emulated = callspec is not None and "simt" in callspec.params.values()
        if (emulated or item.originalname in SLOW_TESTS or item.path.name in SLOW_FILES
                or "tiny_run" in item.fixturenames):
            item.add_marker(pytest.mark.slow)


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
