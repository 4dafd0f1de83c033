"""Builds fused_opt._C: CPU kernels always, CUDA kernels when torch and the toolkit allow it.

FUSED_OPT_CUDA=1 / =0 forces the CUDA build on or off; MAX_JOBS and TORCH_CUDA_ARCH_LIST are
honoured by torch.utils.cpp_extension, and without a visible GPU TORCH_CUDA_ARCH_LIST defaults to
tools/cuda_toolkit.py's DEFAULT_ARCH_LIST. CUDA_HOME, when unset, is the toolkit of the nvcc on
PATH (tools/cuda_toolkit.py). Nothing here targets the build machine's own CPU (no -march=native)
or relaxes IEEE semantics (no fast-math): the wheel must travel.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"

sys.path.insert(0, str(ROOT / "tools"))
import cuda_toolkit  # noqa: E402

# torch.utils.cpp_extension fixes CUDA_HOME when imported, and without it takes the folder two
# levels above the nvcc on PATH: for a wrapper script (/usr/local/bin/nvcc) that folder has no
# libcudart and the link fails. So the toolkit is found first.
CUDA_TOOLKIT = cuda_toolkit.find_cuda_home()
if CUDA_TOOLKIT is not None:
    os.environ["CUDA_HOME"] = str(CUDA_TOOLKIT)

try:
    import torch  # noqa: E402
except ImportError:
    # pip's isolated build environment (plain `pip install .`, `python -m build`) holds only the
    # build-system requirements, on purpose without torch: a torch fetched there (often a multi-GB
    # CUDA build) would not be the torch the extension later loads into.
    sys.exit(cuda_toolkit.NO_TORCH_MESSAGE)
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def cuda_build_problem() -> str | None:
    """Why this build cannot have CUDA kernels, or None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    return cuda_toolkit.cuda_build_problem(CUDA_TOOLKIT, cuda_toolkit.arch_flags())


def build_cuda() -> bool:
    forced = os.environ.get("FUSED_OPT_CUDA")
    if forced is not None and forced != "1":
        return False
    problem = cuda_build_problem()
    if problem is None:
        return True
    if forced == "1":
        sys.exit(f"fused_opt: FUSED_OPT_CUDA=1, but {problem}")
    print(f"fused_opt: building the CPU kernels only: {problem}", file=sys.stderr)
    return False


def sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.glob(pattern))


# -fno-math-errno lets sqrt vectorize; trapping math stays off as in torch's own build.
# No implicit multiply-add contraction on either compiler (-ffp-contract=off, --fmad=false): g++
# contracts only in the AVX2/AVX-512 clones and nvcc everywhere, so the same step would give other
# bits on other CPUs and on the GPU. The element math rounds every product, on every target.
cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]
# torch adds its common nvcc flags (explicit half/bfloat16 conversions, relaxed constexpr) and the
# -gencode flags of TORCH_CUDA_ARCH_LIST. tools/check_cuda_build.py reads both lists from here.
nvcc_flags = ["-O3", "-std=c++17", "--fmad=false"]
include_dirs = [str(CSRC), str(CSRC / "include")]
cpu_sources = sources("*.cpp") + sources("cpu/*.cpp")

if build_cuda():
    extension = CUDAExtension(
        "fused_opt._C",
        cpu_sources + sources("cuda/*.cu") + sources("cuda/*.cpp"),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )
else:
    extension = CppExtension(
        "fused_opt._C",
        cpu_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

setup(
    name="fused_opt",
    version="0.1.0",
    description="Fused optimizer steps for PyTorch: drop-in Adam, AdamW, SGD, RMSprop, Adagrad",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license_expression="BSD-3-Clause",
    license_files=["LICENSE"],
    packages=find_packages(include=["fused_opt", "fused_opt.*"]),
    package_data={"fused_opt": ["py.typed"]},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    # lightning, accelerate: the trainer tests, which skip without them (tested with lightning
    # 2.6.6, whose ModelParallelStrategy needs 2.4, and accelerate 1.16).
    extras_require={"test": ["pytest", "numpy", "lightning>=2.4", "accelerate"],
                    "plot": ["matplotlib"]},
    entry_points={"console_scripts": ["fused-opt-bench=fused_opt.bench.__main__:main"]},
)
