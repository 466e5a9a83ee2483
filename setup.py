"""Build script: the ``convrec`` package and the C++/CUDA extension ``convrec._C`` from ``csrc/``.

The extension uses only the LibTorch stable ABI and the limited Python API, so one
``_C.abi3.so`` serves every CPython >= 3.10 and torch >= 2.10. It is built for the CPU by default
and with the CUDA kernel when nvcc is found (``CUDA_HOME`` or ``PATH``) and torch is a CUDA build;
``CONVREC_CUDA=1`` forces the CUDA kernel, ``CONVREC_CUDA=0`` leaves it out, and
``CONVREC_EXTENSION=0`` skips the extension. Nothing is downloaded. A failed build does not fail
the install: it prints a warning and convrec runs on its PyTorch reference.
"""

from __future__ import annotations

import os
import shutil
import sys
import traceback
from pathlib import Path

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["convrec", "convrec.*"])
CSRC = Path("csrc")
# The oldest torch whose stable ABI has every call the extension makes. .ci/compile_check.py
# compile-checks csrc/ against this release's headers, so raise it only with that check.
EXTENSION_MIN_TORCH = (2, 10)
EXTENSION_MIN_TORCH_STR = "{}.{}.0".format(*EXTENSION_MIN_TORCH)
# The stable ABI of EXTENSION_MIN_TORCH, and Python 3.10.
COMMON_FLAGS = [
    "-DTORCH_TARGET_VERSION=(((0ULL + {}) << 56) | ((0ULL + {}) << 48))".format(
        *EXTENSION_MIN_TORCH
    ),
    "-DPy_LIMITED_API=0x030A0000",
]
# -fno-trapping-math lets the float selects in the row loops vectorise (no IEEE change);
# -fopenmp-simd honours their `omp simd` pragmas without the OpenMP runtime.
CXX_FLAGS = ["-O3", "-std=c++17", "-fvisibility=hidden", "-fno-trapping-math", "-fno-math-errno"]
CXX_FLAGS += ["-fopenmp-simd", *COMMON_FLAGS]
# Also used by .ci/compile_check.py to compile-check the .cu sources on machines without a GPU.
NVCC_FLAGS = ["-O3", "-std=c++17", "-DUSE_CUDA", "--expt-relaxed-constexpr", *COMMON_FLAGS]


def _warn(message: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nWARNING (convrec): {message}\n{bar}\n", file=sys.stderr, flush=True)


def _want_cuda(torch) -> tuple[bool, str]:
    """Whether to compile the CUDA kernel, and why (never asks for a GPU)."""
    flag = os.environ.get("CONVREC_CUDA", "")
    if flag == "0":
        return False, "CONVREC_CUDA=0"
    cuda_home = os.environ.get("CUDA_HOME", "")
    nvcc = shutil.which("nvcc")
    if nvcc is None and cuda_home and Path(cuda_home, "bin", "nvcc").exists():
        nvcc = str(Path(cuda_home, "bin", "nvcc"))
    if flag == "1":
        return True, "CONVREC_CUDA=1"
    if nvcc is None:
        return False, "no nvcc found"
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    return True, f"nvcc at {nvcc}, torch CUDA {torch.version.cuda}"


def _extension_setup() -> dict:
    """``ext_modules`` and ``cmdclass`` for setup(), or nothing when the build is skipped."""
    if os.environ.get("CONVREC_EXTENSION", "") == "0":
        _warn("CONVREC_EXTENSION=0: convrec._C is not built; the reference backend will be used")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        _warn(
            f"torch is not importable while building ({error}); convrec._C is not built. "
            'Install torch first, then: pip install --no-build-isolation -e ".[dev]"'
        )
        return {}

    cuda, why = _want_cuda(torch)
    print(f"convrec: building convrec._C for CPU{' and CUDA' if cuda else ''} ({why})")
    sources = [str(CSRC / "downscale_ops.cpp"), str(CSRC / "downscale_cpu.cpp")]
    kwargs: dict = {"py_limited_api": True, "depends": [str(h) for h in CSRC.glob("*.h")]}
    if cuda:
        sources.append(str(CSRC / "downscale_cuda.cu"))
        extension = cpp_extension.CUDAExtension(
            "convrec._C",
            sources,
            extra_compile_args={"cxx": [*CXX_FLAGS, "-DUSE_CUDA"], "nvcc": NVCC_FLAGS},
            **kwargs,
        )
    else:
        extension = cpp_extension.CppExtension(
            "convrec._C", sources, extra_compile_args={"cxx": CXX_FLAGS}, **kwargs
        )

    class BuildExtensionOrWarn(cpp_extension.BuildExtension):
        """Compile errors become a warning: the package still installs and runs on the
        reference, and ``backend="cpp"`` reports that ``convrec._C`` is missing."""

        def build_extensions(self) -> None:
            try:
                super().build_extensions()
            except Exception:  # any compiler or toolchain failure
                traceback.print_exc()
                _warn(
                    "building convrec._C failed (see the error above); convrec will use its "
                    "PyTorch reference. Fix the toolchain and reinstall to get the fast path."
                )
                self.extensions = []  # nothing to copy or install

    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": BuildExtensionOrWarn.with_options(use_ninja=False)},
        "options": {"bdist_wheel": {"py_limited_api": "cp310"}},
    }


if __name__ == "__main__":  # pip's build backend runs this file as __main__ too
    setup(packages=PACKAGES, **_extension_setup())
