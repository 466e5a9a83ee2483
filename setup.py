"""Build script: the ``convrec`` package and the C++/CUDA extension ``convrec._C`` from ``csrc/``.

The package's Python code runs on torch >= 2.5 (pyproject.toml); the extension needs torch >= 2.10
(EXTENSION_MIN_TORCH). It uses only the LibTorch stable ABI and the limited Python API, so one
``_C.abi3.so`` serves every CPython >= 3.10 and torch >= 2.10, and it compiles against the headers
of every torch from 2.10 to the newest release (.ci/compile_check.py checks the oldest and the
installed one). With an older torch the extension is not built and convrec runs on its PyTorch
reference. It is built for the CPU by default and with the CUDA kernel when nvcc is found
(``CUDA_HOME`` or ``PATH``) and torch is a CUDA build; ``CONVREC_CUDA=1`` forces the CUDA kernel,
``CONVREC_CUDA=0`` leaves it out, and ``CONVREC_EXTENSION=0`` skips the extension. Nothing is
downloaded.

A failed build does not fail the install: when the CUDA part fails the extension is rebuilt for
the CPU alone, and when that fails too convrec runs on its PyTorch reference. What was built, for
which torch, and why a part is missing is written to ``convrec/_build_status.json`` (read by
``convrec.build_status``), because pip shows a successful build's output only with ``-v``; the
one-line warning also goes to the terminal when there is one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

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
# Written next to convrec/__init__.py by the build; convrec.build_status reads it.
STATUS_FILE = "_build_status.json"


def _warn(message: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nWARNING (convrec): {message}\n{bar}\n", file=sys.stderr, flush=True)


def _tell_terminal(message: str) -> None:
    """pip captures a build's output and shows it only on failure or with -v, and convrec's
    build never fails; so a missing part is also written straight to the user's terminal, where
    there is one (none in CI or a non-interactive pip: then the status file carries it)."""
    if sys.stderr.isatty():
        return  # the warning printed to stderr is already on the screen
    with contextlib.suppress(OSError), open("/dev/tty", "w") as tty:
        tty.write(f"\nWARNING (convrec): {message}\n")


def _torch_version(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def new_status(torch_version: str | None) -> dict:
    """The build status before anything is compiled: both parts not built, no warning."""
    return {
        "torch": torch_version,  # the torch whose headers the extension was compiled against
        "min_torch": EXTENSION_MIN_TORCH_STR,
        "parts": {
            "cpu": {"state": "not built", "detail": ""},
            "cuda": {"state": "not built", "detail": ""},
        },
        "warning": None,  # one plain line when a part the user would expect is missing
    }


def write_status(status: dict, package_dirs: list[Path]) -> None:
    """Writes the status into each package directory: the wheel's, and the source tree's for an
    editable install."""
    for directory in package_dirs:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / STATUS_FILE).write_text(json.dumps(status, indent=1) + "\n")


def announce(status: dict) -> None:
    """Shows the status's warning, if any, in the build log and on the terminal."""
    if status["warning"]:
        _warn(status["warning"])
        _tell_terminal(status["warning"])


def error_summary(log: str, error: BaseException) -> str:
    """The first compiler or linker diagnostic in a build log (what a user needs to report),
    else the exception; g++ writes `file:line:col: error: ...`, nvcc `file(line): error: ...`,
    ld `ld: cannot find -lname` before collect2's summary."""
    for line in log.splitlines():
        if re.search(r"(:|\)) (fatal )?error\b|\bld: cannot find ", line):
            return line.strip()[:300]
    return f"{type(error).__name__}: {error}"[:300]


@contextlib.contextmanager
def _tee_build_output():
    """Captures what the compilers (child processes) write to stdout and stderr, to find the
    error for the status, then replays it so the build log still has everything."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 1)
        os.dup2(capture.fileno(), 2)
        result = {"log": ""}
        try:
            yield result
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            capture.seek(0)
            data = capture.read()
            os.write(2, data)
            result["log"] = data.decode(errors="replace")


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


class BuildPyWithStatus(build_py):
    """Writes the build status when the extension was skipped before any compiling (then no
    build_ext runs); when it is compiled, BuildExtensionOrWarn writes it."""

    skipped_status: dict | None = None

    def run(self) -> None:
        super().run()
        if self.skipped_status is not None:
            dirs = [Path(self.build_lib, "convrec")]
            if self.editable_mode:
                dirs.append(Path("convrec"))
            write_status(self.skipped_status, dirs)
            announce(self.skipped_status)


def _skip(status: dict, part_detail: str, warning: str | None) -> dict:
    for part in status["parts"].values():
        part.update(state="skipped", detail=part_detail)
    status["warning"] = warning
    return {
        "cmdclass": {"build_py": type("BuildPy", (BuildPyWithStatus,), {"skipped_status": status})}
    }


def _extension_setup() -> dict:
    """``ext_modules`` and ``cmdclass`` for setup(); without an extension, only the build_py
    that records why."""
    if os.environ.get("CONVREC_EXTENSION", "") == "0":
        print("convrec: CONVREC_EXTENSION=0: convrec._C is not built")
        return _skip(new_status(None), "CONVREC_EXTENSION=0", None)
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        return _skip(
            new_status(None),
            f"torch not importable while building ({error})",
            f"convrec._C was not built: torch was not importable while building ({error}); "
            "convrec runs on its PyTorch reference. Install torch first, then reinstall with "
            "pip install --no-build-isolation.",
        )
    if _torch_version(torch.__version__) < EXTENSION_MIN_TORCH:
        return _skip(
            new_status(torch.__version__),
            f"torch {torch.__version__} < {EXTENSION_MIN_TORCH_STR}",
            f"convrec._C was not built: it needs torch >= {EXTENSION_MIN_TORCH_STR}, found "
            f"{torch.__version__}; convrec runs on its PyTorch reference.",
        )

    status = new_status(torch.__version__)
    cuda, why = _want_cuda(torch)
    if not cuda:
        status["parts"]["cuda"].update(state="skipped", detail=why)
        if torch.version.cuda is not None and why == "no nvcc found":
            # A CUDA torch without nvcc: the user likely expects the CUDA kernel.
            status["warning"] = (
                f"convrec._C was built without its CUDA kernel: no nvcc found (torch is a CUDA "
                f"{torch.version.cuda} build); CUDA tensors use the PyTorch reference. Set "
                "CUDA_HOME or put nvcc on PATH and reinstall, or CONVREC_CUDA=0 to silence this."
            )
    print(f"convrec: building convrec._C for CPU{' and CUDA' if cuda else ''} ({why})")
    sources = [str(CSRC / "downscale_ops.cpp"), str(CSRC / "downscale_cpu.cpp")]
    kwargs: dict = {"py_limited_api": True, "depends": [str(h) for h in CSRC.glob("*.h")]}

    def cpu_extension():
        return cpp_extension.CppExtension(
            "convrec._C", sources, extra_compile_args={"cxx": CXX_FLAGS}, **kwargs
        )

    extension = None
    if cuda:
        try:  # torch looks for the CUDA toolkit here already, and raises without one
            extension = cpp_extension.CUDAExtension(
                "convrec._C",
                [*sources, str(CSRC / "downscale_cuda.cu")],
                extra_compile_args={"cxx": [*CXX_FLAGS, "-DUSE_CUDA"], "nvcc": NVCC_FLAGS},
                **kwargs,
            )
        except Exception as error:
            cuda = False
            detail = f"{type(error).__name__}: {error}"[:300]
            status["parts"]["cuda"].update(state="failed", detail=detail)
            status["warning"] = (
                f"convrec._C is built for the CPU only: its CUDA kernel cannot be built here "
                f"({detail}); CUDA tensors use the PyTorch reference."
            )
            print(f"convrec: the CUDA kernel is left out ({detail})")
    if extension is None:
        extension = cpu_extension()

    class BuildExtensionOrWarn(cpp_extension.BuildExtension):
        """Compile errors become a warning: the package still installs and runs on the
        reference, and ``backend="cpp"`` reports that ``convrec._C`` is missing. A failed CUDA
        build is retried for the CPU alone, so a CUDA toolchain problem keeps the CPU kernel."""

        def run(self) -> None:
            super().run()
            dirs = [Path(self.build_lib, "convrec")]
            if self.inplace:  # editable install: the package is the source tree
                dirs.append(Path("convrec"))
            write_status(status, dirs)
            announce(status)

        def _try_build(self) -> str | None:
            """Builds self.extensions; None on success, else the first compiler error."""
            # BuildExtension wraps the compiler's methods on every call: start each try from
            # the unwrapped ones, or a retry would wrap the wrappers.
            compiler_state = {
                name: getattr(self.compiler, name) for name in ("_compile", "compile", "spawn")
            }
            extensions = list(self.compiler.src_extensions)
            try:
                with _tee_build_output() as output:
                    try:
                        super().build_extensions()
                        return None
                    except Exception as error:  # any compiler or toolchain failure
                        traceback.print_exc()
                        failure = error
                return error_summary(output["log"], failure)
            finally:
                for name, method in compiler_state.items():
                    setattr(self.compiler, name, method)
                self.compiler.src_extensions = extensions

        def build_extensions(self) -> None:
            parts = status["parts"]
            error = self._try_build()
            if error is None:
                parts["cpu"].update(state="built", detail="")
                if cuda:
                    parts["cuda"].update(state="built", detail="")
                return
            if cuda:
                parts["cuda"].update(state="failed", detail=error)
                # Same module name and output file, CPU sources and flags only; the
                # setuptools bookkeeping on the extension object is kept.
                fallback = cpu_extension()
                for field in (
                    "sources",
                    "include_dirs",
                    "library_dirs",
                    "libraries",
                    "runtime_library_dirs",
                    "extra_compile_args",
                    "extra_link_args",
                    "define_macros",
                    "language",
                ):
                    setattr(self.extensions[0], field, getattr(fallback, field))
                self.force = True  # nothing from the failed build counts as up to date
                cpu_error = self._try_build()
                if cpu_error is None:
                    parts["cpu"].update(state="built", detail="")
                    status["warning"] = (
                        "convrec._C was built for the CPU only: compiling its CUDA kernel "
                        f"against torch {torch.__version__} failed ({error}); CUDA tensors use "
                        "the PyTorch reference."
                    )
                    return
                error = cpu_error
            parts["cpu"].update(state="failed", detail=error)
            status["warning"] = (
                f"convrec._C was not built: compiling it against torch {torch.__version__} "
                f"failed ({error}); convrec runs on its PyTorch reference."
            )
            self.extensions = []  # nothing to copy or install

    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": BuildExtensionOrWarn.with_options(use_ninja=False)},
        "options": {"bdist_wheel": {"py_limited_api": "cp310"}},
    }


if __name__ == "__main__":  # pip's build backend runs this file as __main__ too
    setup(packages=PACKAGES, **_extension_setup())
