"""tools/cuda_toolkit.py: how a build finds the CUDA toolkit and decides whether it can build the
CUDA kernels. Fake toolkits stand in for real ones; no nvcc or GPU is needed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import cuda_toolkit  # noqa: E402


def fake_toolkit(root: Path, release: str = "13.0") -> Path:
    """A folder with what is_toolkit looks for, and an nvcc that answers --version and --dryrun
    as the real one does."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "lib64").mkdir()
    (root / "include" / "cuda_runtime.h").touch()
    (root / "lib64" / "libcudart.so").touch()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\n"
        f'case "$1" in --version) echo "Cuda compilation tools, release {release}, V{release}.1";;\n'
        f'  --dryrun) echo "#\\$ _HERE_={root / "bin"}" >&2;;\n'
        "esac\n"
    )
    nvcc.chmod(0o755)
    return root


@pytest.fixture
def environment(monkeypatch, tmp_path):
    """No CUDA_HOME, CUDA_PATH or TORCH_CUDA_ARCH_LIST, and a PATH of one empty folder."""
    for variable in ("CUDA_HOME", "CUDA_PATH", cuda_toolkit.ARCH_LIST_VARIABLE):
        # Set first, so that the teardown also removes what the code under test sets.
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)
    path = tmp_path / "path"
    path.mkdir()
    monkeypatch.setenv("PATH", str(path))
    return path


def test_nvcc_on_path_as_a_link_leads_to_its_toolkit(environment, tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda-13.0")
    (environment / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    assert cuda_toolkit.find_cuda_home() == toolkit.resolve()


def test_nvcc_on_path_as_a_wrapper_script_leads_to_its_toolkit(environment, tmp_path):
    # Like /usr/local/bin/nvcc on this project's machines; torch alone would take the folder above
    # the wrapper's folder, which has no libcudart.
    toolkit = fake_toolkit(tmp_path / "cuda-13.0")
    wrapper = environment / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit / "bin" / "nvcc"} "$@"\n')
    wrapper.chmod(0o755)
    assert cuda_toolkit.find_cuda_home() == toolkit.resolve()


def test_cuda_home_is_taken_as_given(environment, tmp_path, monkeypatch):
    on_path = fake_toolkit(tmp_path / "on-path")
    (environment / "nvcc").symlink_to(on_path / "bin" / "nvcc")
    given = fake_toolkit(tmp_path / "given")
    monkeypatch.setenv("CUDA_HOME", str(given))
    assert cuda_toolkit.find_cuda_home() == given.resolve()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "missing"))
    assert cuda_toolkit.find_cuda_home() is None
    problem = cuda_toolkit.cuda_build_problem(None, [])
    assert problem.startswith(f"CUDA_HOME={tmp_path / 'missing'} is not a CUDA toolkit")


def test_an_nvcc_older_than_12_1_is_a_problem(environment, tmp_path):
    flags = ["-gencode=arch=compute_80,code=sm_80"]
    assert cuda_toolkit.cuda_build_problem(fake_toolkit(tmp_path / "new", "12.1"), flags) is None
    problem = cuda_toolkit.cuda_build_problem(fake_toolkit(tmp_path / "old", "12.0"), flags)
    assert "nvcc >= 12.1" in problem and problem.endswith("is 12.0")


def test_the_default_arch_list_without_a_gpu(environment, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    flags = cuda_toolkit.arch_flags()
    assert os.environ[cuda_toolkit.ARCH_LIST_VARIABLE] == cuda_toolkit.DEFAULT_ARCH_LIST
    assert sorted(cuda_toolkit.targets(flags)) == sorted(
        ["sm_80", "sm_90", "sm_100", "sm_120", "compute_120"])


def test_an_arch_below_sm_70_is_a_problem(environment, monkeypatch, tmp_path):
    monkeypatch.setenv(cuda_toolkit.ARCH_LIST_VARIABLE, "Pascal;8.0")
    problem = cuda_toolkit.cuda_build_problem(fake_toolkit(tmp_path / "cuda"),
                                              cuda_toolkit.arch_flags())
    assert "TORCH_CUDA_ARCH_LIST=Pascal;8.0 gives" in problem
    assert {"sm_60", "sm_61", "compute_61"} == set(problem.split(" gives ")[1].split(", "))
