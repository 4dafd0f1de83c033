"""tools/check_cuda_extension.py's spill check over `cuobjdump -res-usage`, with a fake cuobjdump
that prints what the real one prints: no CUDA build or GPU is needed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import check_cuda_extension  # noqa: E402

def section(arch: str, usages: tuple[str, str]) -> str:
    """One cubin's part of the real output (abridged): its architecture and two functions."""
    functions = "".join(
        f" Function _Z6kernelILi{index}EEvPf:\n  {usage} CONSTANT[0]:32976 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
        for index, usage in enumerate(usages, start=1))
    return (f"\nFatbin elf code:\n================\narch = {arch}\ncode version = [1,8]\nhost = linux\n"
            f"compile_size = 64bit\n\nResource usage:\n Common:\n  GLOBAL:0\n{functions}")


USAGE = (section("sm_90", ("REG:56 STACK:{stack} SHARED:9220 LOCAL:0", "REG:98 STACK:0 SHARED:1025 LOCAL:{local}"))
         + section("sm_100", ("REG:60 STACK:0 SHARED:9220 LOCAL:0", "REG:128 STACK:0 SHARED:25604 LOCAL:0")))


@pytest.fixture
def fake_cuobjdump(tmp_path, monkeypatch):
    """Makes the check run a script that prints `text` for `-res-usage`."""
    def install(text: str) -> None:
        (tmp_path / "usage.txt").write_text(text)
        script = tmp_path / "cuobjdump"
        script.write_text(f'#!/bin/sh\ncat "{tmp_path / "usage.txt"}"\n')
        script.chmod(0o755)
        monkeypatch.setattr(check_cuda_extension, "cuobjdump", lambda: str(script))
    return install


def test_a_build_without_stack_frames_passes(fake_cuobjdump, capsys):
    fake_cuobjdump(USAGE.format(stack=0, local=0))
    check_cuda_extension.check_resource_usage(Path("_C.so"))
    out = capsys.readouterr().out
    assert "sm_90: 2 functions, sm_100: 2 functions" in out
    assert "at most 128 registers and 25604 bytes of static shared memory; 0 with" in out


@pytest.mark.parametrize("stack, local, message", [
    (16, 0, r"sm_90 _Z6kernelILi1EEvPf: 16 bytes stack frame, 0 bytes local"),
    (0, 8, r"sm_90 _Z6kernelILi2EEvPf: 0 bytes stack frame, 8 bytes local"),
])
def test_a_function_with_a_stack_frame_or_local_memory_fails(fake_cuobjdump, stack, local, message):
    fake_cuobjdump(USAGE.format(stack=stack, local=local))
    with pytest.raises(check_cuda_extension.CheckFailed, match=message):
        check_cuda_extension.check_resource_usage(Path("_C.so"))


def test_output_without_functions_fails(fake_cuobjdump):
    fake_cuobjdump("\nFatbin ptx code:\n================\narch = sm_120\n")
    with pytest.raises(check_cuda_extension.CheckFailed, match="listed no function"):
        check_cuda_extension.check_resource_usage(Path("_C.so"))
