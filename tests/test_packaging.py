"""What a user gets from the source distribution and meets at install and import time."""

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
INCLUDE_DIRS = (CSRC, CSRC / "include")


def _compiled_sources() -> list[Path]:
    """Every file setup.py compiles in its CUDA build, which is the CPU build's plus the .cu and
    CUDA glue files (the globs of setup.py's sources())."""
    patterns = ("*.cpp", "cpu/*.cpp", "cuda/*.cu", "cuda/*.cpp")
    return sorted(path for pattern in patterns for path in CSRC.glob(pattern))


def _included(source: Path) -> set[Path]:
    """The project's headers `source` includes, directly or not, with quoted includes resolved
    as the compiler does: beside the including file, then on setup.py's include_dirs."""
    found: set[Path] = set()
    pending = [source]
    while pending:
        current = pending.pop()
        for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', current.read_text(), re.MULTILINE):
            candidates = [current.parent / name] + [base / name for base in INCLUDE_DIRS]
            header = next((path.resolve() for path in candidates if path.exists()), None)
            assert header is not None, f"{current}: #include \"{name}\" resolves to no file"
            if header not in found:
                found.add(header)
                pending.append(header)
    return found


@pytest.fixture(scope="module")
def sdist_names(tmp_path_factory) -> set[str]:
    """The files of a freshly built sdist, as paths relative to its top folder."""
    out = tmp_path_factory.mktemp("sdist")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(out)], cwd=ROOT,
                   check=True, capture_output=True, text=True)
    (archive,) = out.glob("fused_opt-*.tar.gz")
    with tarfile.open(archive) as tar:
        return {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


def test_sdist_ships_every_file_the_build_compiles_or_includes(sdist_names):
    sources = _compiled_sources()
    assert any(path.suffix == ".cu" for path in sources) and len(sources) > 10, sources
    needed = set(sources)
    for source in sources:
        needed |= _included(source)
    missing = sorted(str(path.relative_to(ROOT)) for path in needed
                     if str(path.relative_to(ROOT)) not in sdist_names)
    assert not missing, f"the sdist lacks files the build needs: {missing}"


def test_sdist_ships_the_package_the_build_helpers_and_the_license(sdist_names):
    package = {str(path.relative_to(ROOT)) for path in (ROOT / "fused_opt").rglob("*.py")}
    needed = package | {"fused_opt/py.typed", "tools/cuda_toolkit.py", "setup.py", "pyproject.toml",
                        "README.md", "LICENSE", "CHANGELOG.md", "tests/conftest.py", "tests/simt.py"}
    assert not needed - sdist_names, sorted(needed - sdist_names)


def _run_without_torch(tmp_path: Path, code: list[str], cwd: Path):
    """Runs Python with an importable `torch` that fails as a missing module does: what pip's
    isolated build environment looks like to setup.py."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "torch.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(blocker)}
    return subprocess.run([sys.executable, *code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_setup_without_torch_stops_at_once_naming_the_ways_out(tmp_path):
    result = _run_without_torch(tmp_path, ["setup.py", "--version"], ROOT)
    assert result.returncode != 0
    message = result.stderr
    for needed in ("--no-build-isolation", "FUSED_OPT_CUDA=0", "TORCH_CUDA_ARCH_LIST",
                   "Install fails?"):
        assert needed in message, message
    assert "Traceback" not in message, message


def test_pyproject_build_requirements_leave_torch_to_the_user():
    """A torch in build-system.requires makes pip's isolated build fetch one (a multi-GB CUDA
    build by default) that the installed extension would then not match."""
    import tomllib

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert requires and not [r for r in requires if re.match(r"torch\b", r)], requires


def test_readme_names_the_message_section():
    assert "## Install fails?" in (ROOT / "README.md").read_text()


def test_import_from_an_unbuilt_clone_says_build_it_first(tmp_path):
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "fused_opt", clone / "fused_opt",
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    import torch

    # -S: no .pth files, so an editable install's finder cannot lend the clone its built _C.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{clone}:{Path(torch.__file__).parents[1]}"}
    result = subprocess.run([sys.executable, "-S", "-c", "import fused_opt"], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert "build it first" in last_line and "pip install --no-build-isolation -e ." in last_line, \
        result.stderr
    assert "circular import" not in last_line, result.stderr
