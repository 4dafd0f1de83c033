"""Properties of the compiled library itself: op registrations and vectorized CPU loops."""

import platform
import re
import shutil
import subprocess

import pytest
import torch

import fused_opt
from fused_opt import _C, _ops


@pytest.mark.parametrize("op_name", _ops.OP_NAMES)
def test_every_op_has_a_cpu_kernel(op_name):
    assert _ops.has_kernel(op_name, "CPU")


def test_built_with_cuda_reports_the_registrations():
    expected = all(_ops.has_kernel(name, "CUDA") for name in _ops.OP_NAMES)
    assert fused_opt.built_with_cuda() is expected
    assert isinstance(fused_opt.__version__, str)


def _disassembly() -> str:
    return subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", _C.__file__],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("objdump") is None,
    reason="the multiversioned loops and this disassembly check are x86-64 only (needs objdump)",
)
def test_cpu_loops_have_avx512_avx2_and_baseline_clones_that_vectorize():
    """Every element loop exists in three ISA clones, and the AVX-512 clone uses zmm vectors."""
    header = re.compile(
        r"^[0-9a-f]+ <(.*update_range<.*) \[clone \.(arch_x86_64_v[34]|default)\]>:$"
    )
    clones: dict[str, dict[str, list[str]]] = {}
    body = None
    for line in _disassembly().splitlines():
        match = header.match(line)
        if match:
            body = clones.setdefault(match.group(1), {}).setdefault(match.group(2), [])
        elif not line.strip():
            body = None
        elif body is not None:
            body.append(line)
    assert clones, "no update_range loops found in the library"
    for loop, bodies in clones.items():
        assert set(bodies) == {"arch_x86_64_v4", "arch_x86_64_v3", "default"}, loop
        assert "zmm" in "\n".join(bodies["arch_x86_64_v4"]), f"AVX-512 clone of {loop} is scalar"
        assert "ymm" in "\n".join(bodies["arch_x86_64_v3"]), f"AVX2 clone of {loop} is scalar"

