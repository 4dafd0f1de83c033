#!/usr/bin/env python3
"""Checks an installed CUDA build of fused_opt on a machine that may have no GPU.

Run it with the Python of the environment fused_opt was built in, from the tree that was built
(the import must find that build):

1. fused_opt imports, with torch's CUDA build, and `fused_opt.built_with_cuda()` is True.
2. Every op of fused_opt._ops.OP_NAMES has a CPU, a CUDA and a Meta kernel registered.
3. The shared object's device code, as `cuobjdump --list-elf --list-ptx` lists it, runs on every
   GPU of GPUS: by SASS of the same major generation, no newer than the GPU (a GPU runs the cubins
   of its major version up to its own minor). Each SASS architecture holds one cubin per
   csrc/cuda/*.cu, so no file is missing for any of them. There is PTX too, which the driver
   compiles for GPUs newer than all of these.
4. Every function of every cubin, as `cuobjdump -res-usage` reports it, has no stack frame and no
   local memory: no register spill, no array moved out of registers. This is the check that
   tools/check_cuda_build.py makes with ptxas -v, here on the build a user gets, for every
   architecture it ships (CI runs that tool for one architecture only, to fail early).

cuobjdump is the one on PATH, else the nvidia-cuda-cuobjdump wheel's.
Prints what it found; exits non-zero on any failure.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# The GPUs a default build supports, by compute capability: the README's list.
GPUS = {
    (8, 0): "A100",
    (8, 6): "RTX 30, A10, A40",
    (8, 9): "RTX 40, L4, L40",
    (9, 0): "H100, H200",
    (10, 0): "B200, GB200",
    (10, 3): "B300, GB300",
    (12, 0): "RTX 50, RTX PRO 6000",
    (12, 1): "GB10",
}
# "ELF file    3: _C.3.sm_90.cubin", "PTX file    1: _C.1.sm_120.ptx"; an "a" or "f" suffix marks
# architecture- or family-specific code, which runs on fewer GPUs and is not counted here.
CODE_LINE = re.compile(r"^(ELF|PTX) file\s+\d+: .*\.(?:sm|compute)_(\d+)(a|f)?\.(?:cubin|ptx)$")


class CheckFailed(Exception):
    pass


def cuobjdump() -> str:
    """cuobjdump on PATH, else the one of the nvidia-cuda-cuobjdump wheel (nvidia/cu*/bin)."""
    on_path = shutil.which("cuobjdump")
    if on_path:
        return on_path
    nvidia = importlib.util.find_spec("nvidia")
    for package_dir in map(Path, nvidia.submodule_search_locations if nvidia else []):
        for candidate in sorted(package_dir.glob("cu*/bin/cuobjdump")):
            return str(candidate)
    raise CheckFailed("no cuobjdump on PATH or in site-packages: pip install nvidia-cuda-cuobjdump")


def device_code(library: Path) -> tuple[Counter, set[int]]:
    """Cubins per SASS architecture and the PTX versions in the library, as numbers (sm_90: 90)."""
    result = subprocess.run([cuobjdump(), "--list-elf", "--list-ptx", str(library)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise CheckFailed(f"cuobjdump failed on {library}:\n{result.stdout}{result.stderr}")
    cubins: Counter = Counter()
    ptx: set[int] = set()
    for line in result.stdout.splitlines():
        match = CODE_LINE.match(line.strip())
        if match is None or match.group(3):
            continue
        kind, arch = match.group(1), int(match.group(2))
        if kind == "ELF":
            cubins[arch] += 1
        else:
            ptx.add(arch)
    return cubins, ptx


# " Function _ZN...:" then "  REG:56 STACK:0 SHARED:9220 LOCAL:0 CONSTANT[0]:32976 ..."; the
# architecture of the cubins that follow comes in an "arch = sm_90" line.
ARCH_LINE = re.compile(r"^arch = sm_(\d+)[af]?$")
FUNCTION_LINE = re.compile(r"^Function (\S+):$")
USAGE_LINE = re.compile(r"^REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)\b")


def check_resource_usage(library: Path) -> None:
    result = subprocess.run([cuobjdump(), "-res-usage", str(library)], capture_output=True, text=True)
    if result.returncode != 0:
        raise CheckFailed(f"cuobjdump -res-usage failed on {library}:\n{result.stdout}{result.stderr}")
    arch, function = None, None
    functions: Counter = Counter()
    failures = []
    max_registers = max_shared = 0
    for line in map(str.strip, result.stdout.splitlines()):
        if match := ARCH_LINE.match(line):
            arch = int(match.group(1))
        elif match := FUNCTION_LINE.match(line):
            function = match.group(1)
        elif match := USAGE_LINE.match(line):
            if function is None:
                raise CheckFailed(f"cuobjdump -res-usage: usage without a function: {line}")
            registers, stack, shared, local = map(int, match.groups())
            functions[arch] += 1
            max_registers, max_shared = max(max_registers, registers), max(max_shared, shared)
            if stack or local:
                failures.append(f"sm_{arch} {function}: {stack} bytes stack frame, {local} bytes local")
            function = None
    if not functions:
        raise CheckFailed(f"cuobjdump -res-usage listed no function in {library}")
    print(f"resource usage: {', '.join(f'sm_{a}: {n} functions' for a, n in sorted(functions.items()))}; "
          f"at most {max_registers} registers and {max_shared} bytes of static shared memory; "
          f"{len(failures)} with a stack frame or local memory")
    if failures:
        shown = failures[:20] + ([f"... {len(failures) - 20} more"] if len(failures) > 20 else [])
        raise CheckFailed("functions with a stack frame or local memory (spills?):\n  " + "\n  ".join(shown))


def check_registrations() -> Path:
    if torch.version.cuda is None:
        raise CheckFailed(f"torch {torch.__version__} is not a CUDA build")
    import fused_opt
    from fused_opt import _C, _ops

    library = Path(_C.__file__)
    print(f"fused_opt {fused_opt.__version__} from {library} (torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()})")
    if not fused_opt.built_with_cuda():
        raise CheckFailed("fused_opt.built_with_cuda() is False: no CUDA kernels registered")
    missing = [f"{name}: {key}" for name in _ops.OP_NAMES for key in ("CPU", "CUDA", "Meta")
               if not _ops.has_kernel(name, key)]
    if missing:
        raise CheckFailed(f"ops without a kernel: {', '.join(missing)}")
    print(f"{len(_ops.OP_NAMES)} ops ({', '.join(_ops.OP_NAMES)}) have CPU, CUDA and Meta kernels")
    return library


def check_architectures(library: Path) -> None:
    cubins, ptx = device_code(library)
    print(f"{library.name}: {library.stat().st_size / 2**20:.1f} MiB; SASS "
          f"{', '.join(f'sm_{a} ({n} cubins)' for a, n in sorted(cubins.items())) or 'none'}; "
          f"PTX {', '.join(f'compute_{a}' for a in sorted(ptx)) or 'none'}")
    failures = []
    cu_files = len(list((ROOT / "csrc" / "cuda").glob("*.cu")))
    for arch, count in sorted(cubins.items()):
        if count != cu_files:
            failures.append(f"sm_{arch} has {count} cubins for {cu_files} csrc/cuda/*.cu files")
    for (major, minor), names in GPUS.items():
        runnable = [a for a in cubins if a // 10 == major and a % 10 <= minor]
        if runnable:
            print(f"  sm_{major}{minor} ({names}): SASS sm_{max(runnable)}")
        else:
            failures.append(f"no SASS for sm_{major}{minor} ({names})")
    if not ptx:
        failures.append("no PTX for GPUs newer than these")
    if failures:
        raise CheckFailed("; ".join(failures))


def main() -> int:
    library = check_registrations()
    check_architectures(library)
    check_resource_usage(library)
    print("check_cuda_extension: OK")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckFailed as failure:
        print(f"check_cuda_extension: FAILED: {failure}", file=sys.stderr)
        sys.exit(1)
