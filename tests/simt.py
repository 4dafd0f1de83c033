"""The emulation tier: fused_opt's CUDA kernels, their own source, executed on the CPU.

g++ compiles every csrc/cuda/*.cu unmodified as host C++ with csrc/simt/simt.h included first
(fibers for CUDA threads, OS threads for blocks, real barriers, shuffles, atomics and fences),
together with the kernels' torch glue (csrc/cuda/ops_cuda.cpp), into a module that registers
the ops for CPU tensors as ``torch.ops.fused_opt_simt.*``, with fused_opt's schemas. Pointing the
optimizers at that namespace (``fused_opt._ops.calling``) runs every suite that takes the
``device`` fixture through the CUDA code path. What it cannot show: a missing ``__threadfence``
(x86's memory order is stronger than a GPU's), timing, and the GPU's own math library (``pow``
here is the host's).

Built on first use into build/simt (about two minutes on two cores; later runs reuse it). It
needs the CUDA toolkit's headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h), not a GPU, not
libcudart. Without a toolkit the simt cases skip with the reason, unless FUSED_OPT_REQUIRE_SIMT=1
(CI sets it), which turns that into a failure.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils import cpp_extension

from fused_opt import _ops

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
BUILD = ROOT / "build" / "simt"
REQUIRED = os.environ.get("FUSED_OPT_REQUIRE_SIMT") == "1"
NAMESPACE = "fused_opt_simt"

sys.path.insert(0, str(ROOT / "tools"))
from check_cuda_build import setup_lists  # noqa: E402
from cuda_toolkit import find_cuda_home  # noqa: E402


def _kernel_wrappers() -> list[Path]:
    """One C++ file per .cu: the emulation header, then the kernel source as it is."""
    wrappers = BUILD / "kernels"
    wrappers.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in sorted((CSRC / "cuda").glob("*.cu")):
        wrapper = wrappers / f"{source.stem}_cu.cpp"
        text = f'#include "simt/simt.h"\n#include "cuda/{source.name}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        paths.append(wrapper)
    return paths


def _build():
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("the emulation tier needs the CUDA toolkit's headers (cuda_runtime.h, "
                           "cuda_fp16.h, cuda_bf16.h), and no toolkit was found: set CUDA_HOME")
    flags = setup_lists()["cxx_flags"]
    # torch's nvcc flags that remove the implicit float16/bfloat16 conversions, as the real build.
    no_implicit_half = [f for f in cpp_extension.COMMON_NVCC_FLAGS if f.startswith("-D__CUDA_NO")]
    sources = [
        *_kernel_wrappers(),
        CSRC / "cuda" / "ops_cuda.cpp",
        CSRC / "validate.cpp",
        CSRC / "simt" / "runtime.cpp",
        CSRC / "simt" / "fault_kernels.cpp",
        CSRC / "simt" / "module.cpp",
    ]
    cflags = [
        *(f for f in flags if f not in ("-O3", "-fopenmp")),
        "-O2",
        *no_implicit_half,
        # A GPU faults on a misaligned vector access; x86 does not. The handler in runtime.cpp
        # fails the launch instead.
        "-fsanitize=alignment",
        "-fsanitize-recover=alignment",
        # The emulated kernels share fused_opt's symbol names; keep them out of other libraries'
        # way, and take the stream from the emulation, not from libtorch_cuda.
        "-fvisibility=hidden",
        "-Daoti_torch_get_current_cuda_stream=fused_opt_simt_current_stream",
    ]
    BUILD.mkdir(parents=True, exist_ok=True)
    module = cpp_extension.load(
        name=NAMESPACE,
        sources=[str(s) for s in sources],
        extra_cflags=cflags,
        extra_include_paths=[str(CSRC), str(CSRC / "include"), str(cuda_home / "include")],
        build_directory=str(BUILD),
        verbose=os.environ.get("FUSED_OPT_SIMT_VERBOSE") == "1",
    )
    _ops.register_fakes(NAMESPACE)
    return module


@functools.cache
def module():
    """The emulation module, built on first use; RuntimeError when it cannot be built here."""
    return _build()


@functools.cache
def unavailable_reason() -> str | None:
    """Why the emulation tier cannot run here (None when it can). Under FUSED_OPT_REQUIRE_SIMT=1
    a missing toolkit is an error, not a reason to skip."""
    if REQUIRED:
        module()
        return None
    try:
        module()
    except RuntimeError as error:
        return str(error)
    return None


def ops():
    module()
    return getattr(torch.ops, NAMESPACE)


# Emulated devices and seeds the fixtures cycle through: device d runs persistent grids of d + 1
# blocks, so these cover 2 to 8 blocks, each with its own block and thread orders.
SCHEDULES = [(1, 11), (3, 12), (7, 13), (2, 14), (5, 15)]


def schedule_of(test_id: str) -> int:
    """A schedule for a test, fixed by its id, so that tests spread over the schedules."""
    return zlib.crc32(test_id.encode()) % len(SCHEDULES)


def kernel_name(record: tuple[str, int, int]) -> str:
    """The kernel of a launch-log record, told by its parameter types."""
    return "grad_norm_kernel" if "GradTable" in record[0] else "multi_tensor_kernel"


@contextlib.contextmanager
def emulated(schedule: int = 0, workers: int = 2) -> Iterator[None]:
    """Runs the optimizers' op calls through the emulated CUDA kernels for a while."""
    sim = module()
    device, seed = SCHEDULES[schedule % len(SCHEDULES)]
    previous, previous_threads = sim.config(), torch.get_num_threads()
    sim.configure(device=device, workers=workers, seed=seed)
    # The emulation's workers need the cores: idle OpenMP threads of the CPU side spin on them.
    torch.set_num_threads(1)
    try:
        with _ops.calling(ops()):
            yield
    finally:
        sim.configure(**previous)
        torch.set_num_threads(previous_threads)

