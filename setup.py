"""Builds fused_opt._C: CPU kernels always, CUDA kernels when torch and the toolkit allow it.

FUSED_OPT_CUDA=1 / =0 forces the CUDA build on or off; MAX_JOBS and TORCH_CUDA_ARCH_LIST are
honoured by torch.utils.cpp_extension. Nothing here targets the build machine's own CPU
(no -march=native) or relaxes IEEE semantics (no fast-math): the wheel must travel.
"""

import os
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def build_cuda() -> bool:
    forced = os.environ.get("FUSED_OPT_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


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
    packages=find_packages(include=["fused_opt", "fused_opt.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={"test": ["pytest", "numpy"], "plot": ["matplotlib"]},
    entry_points={"console_scripts": ["fused-opt-bench=fused_opt.bench.__main__:main"]},
)
