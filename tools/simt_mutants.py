#!/usr/bin/env python3
"""Shows that the emulation tier bites: each mutant is one deliberate bug in the CUDA kernels,
applied to a copy of the tree (the repository's kernels are never touched), built into that copy's
emulation module, and run against the emulated tests; a mutant that no test fails is reported.

    python tools/simt_mutants.py [--only NAME ...] [--keep]

Needs what the emulation tier needs (tests/simt.py) and fused_opt installed (its CPU kernels are
the tests' reference). Each mutant rebuilds the emulation module (a few minutes on two cores).
Prints one line per mutant: caught or not, and the first test that failed; exits non-zero when a
mutant the tier should catch is missed (or one it cannot catch is caught).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    original: str  # must occur exactly once
    mutated: str
    # False for a bug the tier cannot show on this machine's memory order (README).
    catchable: bool = True


MUTANTS = [
    Mutant("find_tensor off by one", "csrc/cuda/multi_tensor.cuh",
           "if (first_chunk[mid] <= chunk) {", "if (first_chunk[mid] < chunk) {"),
    Mutant("ticket not reset", "csrc/cuda/multi_tensor.cuh",
           "  if (threadIdx.x == 0) *finished_blocks = 0;\n", "\n"),
    Mutant("first block takes the ticket", "csrc/cuda/multi_tensor.cuh",
           "last_block = atomicAdd(finished_blocks, 1u) == gridDim.x - 1;",
           "last_block = atomicAdd(finished_blocks, 1u) == 0;"),
    Mutant("no barrier before the ticket", "csrc/cuda/multi_tensor.cuh",
           "  __shared__ bool last_block;\n  __syncthreads();\n",
           "  __shared__ bool last_block;\n"),
    Mutant("vector path on misaligned data", "csrc/cuda/multi_tensor.cuh",
           "const int vectorized = table.aligned[t] ? n / kWidth * kWidth : 0;",
           "const int vectorized = n / kWidth * kWidth;"),
    Mutant("vector tail of one element dropped", "csrc/cuda/multi_tensor.cuh",
           "    if (vectorized < n) {", "    if (vectorized + 1 < n) {"),
    Mutant("wrong group index", "csrc/cuda/multi_tensor.cuh",
           "const typename Op::Group group = groups.at[table.group[t]];",
           "const typename Op::Group group = groups.at[0];"),
    Mutant("master's rounding not written to the param", "csrc/cuda/multi_tensor.cuh",
           "        next_copy[j * kBlockSize] = rounded;\n", "\n"),
    Mutant("grad_norm partials overwritten across launches", "csrc/cuda/grad_norm.cu",
           "      workspace.squares[blockIdx.x] += sums.squares;",
           "      workspace.squares[blockIdx.x] = sums.squares;"),
    Mutant("shuffle tree cut short", "csrc/cuda/grad_norm.cu",
           "  for (int offset = 16; offset > 0; offset /= 2) {\n    sums.squares",
           "  for (int offset = 16; offset > 1; offset /= 2) {\n    sums.squares"),
    Mutant("no fence before the ticket (not catchable here)", "csrc/cuda/multi_tensor.cuh",
           "    __threadfence();\n"
           "    last_block = atomicAdd(finished_blocks, 1u) == gridDim.x - 1;",
           "    last_block = atomicAdd(finished_blocks, 1u) == gridDim.x - 1;", catchable=False),
]

# The emulated tests, fastest first; -x stops at the first failure.
TESTS = ["tests/test_simt.py", "tests/test_cuda.py", "tests/test_parity.py",
         "tests/test_mixed_precision.py"]


def copy_tree(destination: Path) -> None:
    for name in ("csrc", "tests", "tools", "setup.py"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, destination / name)


def apply(mutant: Mutant, tree: Path) -> None:
    path = tree / mutant.path
    text = path.read_text()
    count = text.count(mutant.original)
    if count != 1:
        raise SystemExit(f"mutant '{mutant.name}': the original text occurs {count} times in "
                         f"{mutant.path}; update the mutant to the current source")
    path.write_text(text.replace(mutant.original, mutant.mutated))


def run(mutant: Mutant, workdir: Path) -> tuple[bool, str, float]:
    tree = workdir / re.sub(r"\W+", "-", mutant.name)
    copy_tree(tree)
    apply(mutant, tree)
    start = time.monotonic()
    env = dict(os.environ, FUSED_OPT_REQUIRE_SIMT="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *TESTS, "-x", "-q", "-k", "simt", "-p", "no:cacheprovider",
         "--no-header"], cwd=tree, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.MULTILINE)
    if result.returncode == 0:
        return False, "no test failed", elapsed
    return True, failed[0] if failed else result.stdout.strip().splitlines()[-1], elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="names (substrings) of the mutants to run")
    parser.add_argument("--keep", action="store_true", help="keep the mutated trees")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if not args.only or any(o in m.name for o in args.only)]
    workdir = Path(tempfile.mkdtemp(prefix="simt-mutants-"))
    unexpected = 0
    try:
        for mutant in mutants:
            caught, detail, elapsed = run(mutant, workdir)
            unexpected += caught != mutant.catchable
            verdict = "CAUGHT" if caught else "MISSED" if mutant.catchable else "MISSED (known)"
            print(f"{verdict:<15} {mutant.name:<50} {elapsed:5.0f} s  {detail}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
