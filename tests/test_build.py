"""Properties of the compiled library itself: op registrations and vectorized CPU loops."""

import functools
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


_X86_64_OBJDUMP = pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("objdump") is None,
    reason="the multiversioned loops and this disassembly check are x86-64 only (needs objdump)",
)


@functools.cache
def _loop_clones() -> dict[tuple[str, str], dict[str, list[str]]]:
    """The disassembled CPU element loops: {(wrapper, template arguments): {clone: lines}}."""
    header = re.compile(
        r"^[0-9a-f]+ <.*(update_range_16bit|update_range_wide)<(.*)"
        r" \[clone \.(arch_x86_64_v[34]|default)\]>:$"
    )
    clones: dict[tuple[str, str], dict[str, list[str]]] = {}
    body = None
    for line in _disassembly().splitlines():
        match = header.match(line)
        if match:
            loop = (match.group(1), match.group(2))
            body = clones.setdefault(loop, {}).setdefault(match.group(3), [])
        elif not line.strip():
            body = None
        elif body is not None:
            body.append(line)
    return clones


@_X86_64_OBJDUMP
def test_cpu_loops_have_isa_clones_that_vectorize():
    """16-bit loops come in AVX-512, AVX2 and baseline clones, wider ones in AVX2 and baseline;
    the AVX-512 clones use zmm vectors and the AVX2 clones ymm vectors."""
    clones = _loop_clones()
    kinds = {kind for kind, _ in clones}
    assert kinds == {"update_range_16bit", "update_range_wide"}, kinds
    for (kind, loop), bodies in clones.items():
        expected = {"arch_x86_64_v3", "default"}
        if kind == "update_range_16bit":
            expected.add("arch_x86_64_v4")
            assert "zmm" in "\n".join(bodies["arch_x86_64_v4"]), f"AVX-512 clone of {loop} is scalar"
        assert set(bodies) == expected, (kind, loop)
        assert "ymm" in "\n".join(bodies["arch_x86_64_v3"]), f"AVX2 clone of {loop} is scalar"


@_X86_64_OBJDUMP
def test_cpu_loops_prefetch_all_but_two_stream_loops():
    """Every clone of a loop with states or a 16-bit param copy prefetches; plain SGD without
    masters (a param and a grad: two streams) leaves them to the hardware."""
    clones = _loop_clones()
    two_streams = 0
    for (_, loop), bodies in clones.items():
        plain_sgd = "Momentum)0" in loop and "NoCopy" in loop
        two_streams += plain_sgd
        for clone, lines in bodies.items():
            prefetches = any("prefetch" in line for line in lines)
            assert prefetches is not plain_sgd, (clone, loop)
    assert two_streams > 0
