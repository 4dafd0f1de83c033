"""The CUDA toolkit a fused_opt build uses, and whether it can build the CUDA kernels.

Shared by setup.py and the tools that check the CUDA build, so that they agree on the toolkit and
on the target architectures. Importing it needs no torch: setup.py must set CUDA_HOME before
torch.utils.cpp_extension is imported, because that module fixes CUDA_HOME at import.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

# The kernels take their tensor tables by value, up to 32 KB of kernel parameters: CUDA 12.1 raised
# the limit from 4 KB, for sm_70 and newer (and a driver of R530 or newer at run time). An older
# nvcc stops with "Formal parameter space overflowed".
MIN_NVCC_VERSION = (12, 1)
MIN_SM = 70
# TORCH_CUDA_ARCH_LIST for a build that sees no GPU and is given no list (torch's own default then
# is the visible GPUs' list, which is empty, and it crashes). SASS for the data-centre generations
# (sm_80 also runs on sm_86/sm_87/sm_89, sm_100 on sm_103) and for consumer Blackwell (sm_120, also
# sm_121), plus sm_120's PTX, which the driver compiles for GPUs newer than all of these.
DEFAULT_ARCH_LIST = "8.0;9.0;10.0;12.0+PTX"
ARCH_LIST_VARIABLE = "TORCH_CUDA_ARCH_LIST"
# What setup.py says when it cannot import torch, which is what pip's isolated build looks like.
NO_TORCH_MESSAGE = f"""\
fused_opt: cannot import torch, so there is nothing to compile the extension against.
fused_opt compiles against the torch that will run it, and pip's isolated build environment
(`pip install .` or `pip install fused_opt-*.tar.gz` without --no-build-isolation, or
`python -m build` without --no-isolation) has no torch. Install torch first, then build in
your own environment:

    pip install --no-build-isolation .

With a CUDA build of torch: FUSED_OPT_CUDA=0 builds the CPU kernels only; {ARCH_LIST_VARIABLE}
(e.g. "9.0") picks the GPU architectures (default: the visible GPUs, else {DEFAULT_ARCH_LIST}).
See the README's "Install fails?"."""


def is_toolkit(home: Path) -> bool:
    """Whether `home` holds what a build needs: nvcc, the runtime headers and libcudart."""
    return all((home / part).exists()
               for part in ("bin/nvcc", "include/cuda_runtime.h", "lib64/libcudart.so"))


def _toolkit_of_nvcc_on_path() -> Path | None:
    """The folder above the folder of the `nvcc` on PATH, once links are followed; where that is
    no toolkit, the folder above the nvcc that actually runs, as nvcc reports it (`_HERE_`), so that
    a wrapper script that execs the toolkit's nvcc from elsewhere leads to the toolkit too."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    linked = Path(nvcc).resolve().parent.parent
    if is_toolkit(linked):
        return linked
    dry_run = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull],
                             capture_output=True, text=True)
    here = re.search(r"^#\$ _HERE_=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
    return Path(here.group(1)).parent if here else None


def find_cuda_home() -> Path | None:
    """The CUDA toolkit root: CUDA_HOME or CUDA_PATH where set (as torch takes them); else the
    toolkit of the nvcc on PATH, through links and wrapper scripts (torch itself takes the folder
    two levels above that nvcc, which for a wrapper is not the toolkit); else /usr/local/cuda.
    None when the chosen folder is not a toolkit (see is_toolkit)."""
    given = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(given)] if given else [_toolkit_of_nvcc_on_path(), Path("/usr/local/cuda")]
    return next((home.resolve() for home in candidates if home and is_toolkit(home)), None)


def nvcc_version(home: Path) -> tuple[int, int]:
    """The (major, minor) release of the toolkit's nvcc."""
    output = subprocess.run([str(home / "bin" / "nvcc"), "--version"],
                            capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", output)
    if match is None:
        raise RuntimeError(f"cannot read the release from `{home / 'bin' / 'nvcc'} --version`:\n"
                           f"{output}")
    return int(match.group(1)), int(match.group(2))


def arch_flags() -> list[str]:
    """The -gencode flags torch will pass to nvcc for this build: TORCH_CUDA_ARCH_LIST, else the
    visible GPUs' architectures, else (no GPU visible) DEFAULT_ARCH_LIST, which this sets."""
    import torch
    from torch.utils import cpp_extension

    if not os.environ.get(ARCH_LIST_VARIABLE) and not torch.cuda.is_available():
        os.environ[ARCH_LIST_VARIABLE] = DEFAULT_ARCH_LIST
    # The private helper BuildExtension itself calls, so that what is checked here is what nvcc
    # gets, TORCH_CUDA_ARCH_LIST's named generations and "+PTX" included.
    return cpp_extension._get_cuda_arch_flags()


def targets(flags: list[str]) -> list[str]:
    """The code targets of -gencode flags, e.g. ['sm_80', 'sm_90', 'compute_90']."""
    return re.findall(r",code=(\w+)", " ".join(flags))


def cuda_build_problem(home: Path | None, flags: list[str]) -> str | None:
    """Why the CUDA kernels cannot be built with the toolkit at `home` for the targets of the
    -gencode `flags`, or None when they can."""
    if home is None:
        parts = "bin/nvcc, include/cuda_runtime.h, lib64/libcudart.so"
        for variable in ("CUDA_HOME", "CUDA_PATH"):
            if os.environ.get(variable):
                return f"{variable}={os.environ[variable]} is not a CUDA toolkit (no {parts})"
        return (f"no CUDA toolkit ({parts}) found from the nvcc on PATH or in /usr/local/cuda; "
                f"set CUDA_HOME to the toolkit's root")
    needs = (f"the kernels need up to 32 KB of kernel parameters: nvcc >= "
             f"{'.'.join(map(str, MIN_NVCC_VERSION))} and sm_{MIN_SM} or newer")
    version = nvcc_version(home)
    if version < MIN_NVCC_VERSION:
        return f"{needs}, and {home / 'bin' / 'nvcc'} is {'.'.join(map(str, version))}"
    too_old = [t for t in targets(flags) if int(re.sub(r"\D", "", t)) < MIN_SM]
    if too_old:
        arch_list = os.environ.get(ARCH_LIST_VARIABLE)
        source = f"{ARCH_LIST_VARIABLE}={arch_list}" if arch_list else "the visible GPUs"
        return f"{needs}, and {source} gives {', '.join(too_old)}"
    return None
