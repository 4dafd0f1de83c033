#!/usr/bin/env python3
"""Proves on a machine without a GPU, and with a CPU build of torch, that the CUDA extension builds.

1. Every csrc/cuda/*.cu compiles with nvcc for the architectures a build here ships
   (TORCH_CUDA_ARCH_LIST, else tools/cuda_toolkit.py's DEFAULT_ARCH_LIST), with the flags of the
   real build (torch's common nvcc flags and setup.py's own), and ptxas -v reports no spill and no
   stack frame for any function (a stack frame without spills means an array went to local
   memory). The toolkit is the one setup.py would use (tools/cuda_toolkit.py's find_cuda_home).
2. The torch glue (csrc/cuda/*.cpp) compiles against this torch's headers, and so does the rest of
   the extension's C++ (csrc/*.cpp, csrc/cpu/*.cpp).
3. All of it links into one shared library against libtorch, libc10 and libcudart, and every symbol
   the library leaves undefined is defined by a library it links, by the Python interpreter, or is
   one of EXPECTED_FROM_TORCH_CUDA, which libtorch_cuda exports in a CUDA build of torch.

The .cu files include no torch header (the CPU wheel lacks c10/cuda's generated headers), so
this script gives nvcc no torch include directory: a .cu that starts to need torch fails here.

Prints one line per kernel and architecture (registers, stack frame, spills) and the time taken;
exits non-zero on any failure. Objects and the library go to build/cuda-check/. MAX_JOBS limits the
parallel compiler processes (default: the CPU count).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils import cpp_extension

import cuda_toolkit

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
OUT = ROOT / "build" / "cuda-check"
# The C shim's current-stream getter: declared in ops_cuda.cpp, exported by libtorch_cuda.
EXPECTED_FROM_TORCH_CUDA = {"aoti_torch_get_current_cuda_stream"}
# Defined by the interpreter that imports the extension; extensions never link libpython.
PYTHON_SYMBOL = re.compile(r"^_?Py")


class CheckFailed(Exception):
    pass


@dataclass
class FunctionReport:
    source: str
    arch: str
    name: str
    is_kernel: bool
    registers: int | None = None
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


def setup_lists() -> dict[str, list[str]]:
    """The flag lists assigned in setup.py (cxx_flags, nvcc_flags), read without running it."""
    lists = {}
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id in ("cxx_flags", "nvcc_flags"):
                lists[target.id] = ast.literal_eval(node.value)
    missing = {"cxx_flags", "nvcc_flags"} - lists.keys()
    if missing:
        raise CheckFailed(f"setup.py no longer assigns {', '.join(sorted(missing))} as a literal list")
    return lists


def run(cmd: list[str], what: str) -> str:
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise CheckFailed(f"{what} failed (exit {result.returncode}):\n$ {' '.join(cmd)}\n{output}")
    return output


def parse_ptxas(source: str, log: str) -> list[FunctionReport]:
    reports: list[FunctionReport] = []
    arch = "?"
    kernel_names: set[str] = set()
    current: FunctionReport | None = None
    for line in log.splitlines():
        if match := re.search(r"Compiling entry function '([^']+)' for 'sm_(\d+)'", line):
            arch = match.group(2)
            kernel_names.add(match.group(1))
        elif match := re.search(r"Function properties for (\S+)", line):
            name = match.group(1)
            current = FunctionReport(source, arch, name, is_kernel=name in kernel_names)
            reports.append(current)
        elif match := re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        ):
            if current is not None:
                current.stack, current.spill_stores, current.spill_loads = map(int, match.groups())
        elif match := re.search(r"Used (\d+) registers", line):
            if current is not None:
                current.registers = int(match.group(1))
    return reports


def compile_cu(nvcc: Path, flags: list[str], source: Path) -> tuple[Path, list[FunctionReport], str]:
    obj = OUT / (source.stem + ".cu.o")
    cmd = [str(nvcc), *flags, "-Xptxas", "-v", "-Xcompiler", "-fPIC",
           f"-I{CSRC}", f"-I{CSRC / 'include'}", "-c", str(source), "-o", str(obj)]
    log = run(cmd, f"nvcc {source.relative_to(ROOT)}")
    warnings = "\n".join(l for l in log.splitlines() if "warning" in l.lower())
    return obj, parse_ptxas(source.name, log), warnings


def compile_cpp(flags: list[str], includes: list[str], source: Path) -> Path:
    obj = OUT / (str(source.relative_to(CSRC)).replace("/", "_") + ".o")
    cmd = ["c++", *flags, "-fPIC", *(f"-I{d}" for d in includes), "-c", str(source), "-o", str(obj)]
    run(cmd, f"c++ {source.relative_to(ROOT)}")
    return obj


def demangle(names: list[str]) -> list[str]:
    if shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return out.stdout.splitlines() if out.returncode == 0 else names


def short_kernel_name(demangled: str) -> str:
    """'multi_tensor_kernel<AdamOp<true, false, (WeightDecay)2>, TensorTable<5, true> >' and alike:
    no namespaces, no parameter list (the first '(' outside the template arguments)."""
    name = re.sub(r"fused_opt::(cuda::|math::)?|\(anonymous namespace\)::|^void ", "", demangled)
    depth = 0
    for index, char in enumerate(name):
        depth += {"<": 1, ">": -1}.get(char, 0)
        if char == "(" and depth == 0:
            return name[:index]
    return name


def undefined_symbols(library: Path) -> set[str]:
    out = run(["nm", "-D", "--undefined-only", "--format=posix", str(library)], "nm")
    symbols = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] == "U":  # weak references ('w') may stay unresolved
            symbols.add(parts[0].split("@")[0])
    return symbols


def linked_libraries(library: Path, search: list[Path]) -> list[Path]:
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(map(str, search)))
    out = subprocess.run(["ldd", str(library)], capture_output=True, text=True, env=env).stdout
    paths, missing = [], []
    for line in out.splitlines():
        if "not found" in line:
            missing.append(line.split()[0])
        elif match := re.search(r"=> (\S+)", line) or re.match(r"\s*(/\S+) \(0x", line):
            paths.append(Path(match.group(1)))  # the second form: the dynamic loader itself
    if missing:
        raise CheckFailed(f"{library.name} needs libraries that cannot be found: {missing}")
    return paths


def defined_symbols(library: Path) -> set[str]:
    out = run(["nm", "-D", "--defined-only", "--format=posix", str(library)], "nm")
    return {line.split()[0].split("@")[0] for line in out.splitlines() if line.split()}


def main() -> int:
    start = time.monotonic()
    jobs = max(1, int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
    OUT.mkdir(parents=True, exist_ok=True)
    flags = setup_lists()
    cuda_home = cuda_toolkit.find_cuda_home()
    arch_flags = cuda_toolkit.arch_flags()
    problem = cuda_toolkit.cuda_build_problem(cuda_home, arch_flags)
    if problem:
        raise CheckFailed(problem)
    nvcc = cuda_home / "bin" / "nvcc"
    nvcc_flags = [*cpp_extension.COMMON_NVCC_FLAGS, *flags["nvcc_flags"], *arch_flags]
    # torch's BuildExtension adds the language standard to the C++ flags (C++20 for torch 2.13).
    cxx_flags = [*flags["cxx_flags"], "-std=c++20", "-DTORCH_API_INCLUDE_EXTENSION_H",
                 "-DTORCH_EXTENSION_NAME=_C"]
    cxx_includes = [str(CSRC), str(CSRC / "include"), *cpp_extension.include_paths(),
                    sysconfig.get_paths()["include"], str(cuda_home / "include")]

    cu_sources = sorted((CSRC / "cuda").glob("*.cu"))
    cpp_sources = sorted([*CSRC.glob("*.cpp"), *(CSRC / "cpu").glob("*.cpp"),
                          *(CSRC / "cuda").glob("*.cpp")])
    if not cu_sources:
        raise CheckFailed("no csrc/cuda/*.cu files")
    print(f"check_cuda_build: {len(cu_sources)} .cu files for "
          f"{', '.join(cuda_toolkit.targets(arch_flags))} with "
          f"{nvcc} ({' '.join(nvcc_flags)}); {len(cpp_sources)} C++ files against torch "
          f"{torch.__version__}; {jobs} jobs", flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        cu_jobs = [pool.submit(compile_cu, nvcc, nvcc_flags, s) for s in cu_sources]
        cpp_jobs = [pool.submit(compile_cpp, cxx_flags, cxx_includes, s) for s in cpp_sources]
        cu_results = [job.result() for job in cu_jobs]
        cpp_objects = [job.result() for job in cpp_jobs]

    reports = [report for _, file_reports, _ in cu_results for report in file_reports]
    for (_, _, warnings), source in zip(cu_results, cu_sources):
        if warnings:
            print(f"warnings from {source.name}:\n{warnings}")
    kernels = [r for r in reports if r.is_kernel]
    names = demangle([r.name for r in kernels])
    print(f"\n{'file':<16}{'arch':<7}{'regs':>5}{'stack':>7}{'spill st/ld':>13}  kernel")
    for report, name in sorted(zip(kernels, names), key=lambda x: (x[0].source, x[0].arch, x[1])):
        print(f"{report.source:<16}sm_{report.arch:<4}{report.registers or 0:>5}{report.stack:>7}"
              f"{f'{report.spill_stores}/{report.spill_loads}':>13}  {short_kernel_name(name)}")
    bad = [r for r in reports if r.stack or r.spill_stores or r.spill_loads]
    registers = [r.registers for r in kernels if r.registers is not None]
    print(f"\n{len(kernels)} kernels ({len(reports) - len(kernels)} device functions besides), "
          f"registers {min(registers)}-{max(registers)}, "
          f"{len(bad)} functions with spills or a stack frame")
    if bad:
        raise CheckFailed("ptxas reports local memory use:\n" + "\n".join(
            f"  {r.source} sm_{r.arch} {r.name}: stack {r.stack}, spill stores {r.spill_stores}, "
            f"spill loads {r.spill_loads}" for r in bad))

    library = OUT / "_C.so"
    torch_lib = Path(torch.__file__).parent / "lib"
    cuda_lib = cuda_home / "lib64"
    objects = [str(obj) for obj, _, _ in cu_results] + [str(obj) for obj in cpp_objects]
    run(["c++", "-shared", "-fopenmp", "-o", str(library), *objects, f"-L{torch_lib}",
         f"-L{cuda_lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python", "-lcudart"], "link")
    undefined = undefined_symbols(library)
    provided: set[str] = set()
    for dependency in linked_libraries(library, [torch_lib, cuda_lib]):
        provided |= defined_symbols(dependency)
    unresolved = sorted(s for s in undefined - provided - EXPECTED_FROM_TORCH_CUDA
                        if not PYTHON_SYMBOL.match(s))
    if unresolved:
        raise CheckFailed(f"{library.name} leaves {len(unresolved)} symbols unresolved:\n  " +
                          "\n  ".join(demangle(unresolved)))
    expected = sorted(undefined & EXPECTED_FROM_TORCH_CUDA)
    print(f"linked {library.relative_to(ROOT)}: every undefined symbol resolves "
          f"(left to libtorch_cuda: {', '.join(expected) or 'none'})")
    print(f"check_cuda_build: OK in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckFailed as failure:
        print(f"check_cuda_build: FAILED: {failure}", file=sys.stderr)
        sys.exit(1)
