"""Compile-checks csrc/ against the headers of one or more torch versions, without a GPU.

    python .ci/compile_check.py [--torch installed|oldest|X.Y.Z]... [--no-cuda]

``installed`` (the default) uses the torch this Python imports; ``oldest`` the lowest torch that
setup.py declares the extension for (EXTENSION_MIN_TORCH); X.Y.Z any release. Headers of a
release other than the installed one come from its PyPI wheel: downloaded once, only
``torch/include`` kept in a cache outside the repository (CONVREC_CI_CACHE, default
~/.cache/convrec-ci), the wheel deleted. A download that fails is an error, never a pass.

C++ sources get ``g++ -fsyntax-only`` and CUDA sources ``nvcc -c`` for sm_90, both with the flags
setup.py builds with, so a header a torch release lacks shows up here and not at a user's
``import convrec._C``. Without nvcc the CUDA sources are reported as not checked.
"""

from __future__ import annotations

import argparse
import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
# Python's own headers: downscale_ops.cpp defines the module init with the limited API.
PYTHON_INCLUDE = sysconfig.get_paths()["include"]


def build_config() -> dict:
    # Run as a module, not __main__: setup.py then defines its flags and builds nothing.
    return runpy.run_path(str(ROOT / "setup.py"))


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "convrec-ci"
    return Path(os.environ.get("CONVREC_CI_CACHE", default))


def fetch_headers(version: str) -> Path:
    """The include root of torch==version, from the cache or from its wheel."""
    dest = cache_dir() / f"torch-{version}-include"
    if (dest / "torch" / "include" / "torch").is_dir():
        return dest / "torch" / "include"
    dest.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        # Only the headers are wanted: one wheel, no dependencies, for the Python this project
        # declares. The install-time pins (constraints) do not apply to a download of headers.
        env = {**os.environ, "PIP_CONSTRAINT": os.devnull}
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--python-version",
            "3.11",
            "-d",
            tmp,
            f"torch=={version}",
        ]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("torch-*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            sys.exit(
                f"compile_check: could not download the torch {version} wheel for its headers "
                f"(pip exit {result.returncode}):\n{result.stdout}{result.stderr}"
            )
        staging = Path(tmp, "include")
        with zipfile.ZipFile(wheels[0]) as wheel:
            names = [n for n in wheel.namelist() if n.startswith("torch/include/")]
            wheel.extractall(staging, names)
        wheels[0].unlink()
        # Renamed into place only when complete, so an interrupted run leaves no half cache.
        staging.rename(dest)
    print(
        f"compile_check: torch {version} headers cached in {dest} "
        f"({time.monotonic() - started:.0f} s)"
    )
    return dest / "torch" / "include"


def installed_headers() -> tuple[str, Path]:
    import torch

    return torch.__version__, Path(torch.__file__).parent / "include"


def checks(include: Path, config: dict, cuda: bool) -> list[tuple[str, list[str]]]:
    dirs = [f"-I{include}", f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}"]
    jobs = []
    for source in sorted(CSRC.glob("*.cpp")):
        command = ["g++", "-fsyntax-only", *config["CXX_FLAGS"], *dirs, f"-I{PYTHON_INCLUDE}"]
        jobs.append((source.name, [*command, "-Wall", str(source)]))
    if cuda:
        for source in sorted(CSRC.glob("*.cu")):
            command = ["nvcc", "-c", str(source), "-o", os.devnull, *config["NVCC_FLAGS"], *dirs]
            command += ["-gencode", "arch=compute_90,code=sm_90", "-Xcompiler", "-Wall"]
            jobs.append((source.name, command))
    return jobs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", action="append", help="installed, oldest or a version")
    parser.add_argument("--no-cuda", action="store_true", help="check the C++ sources only")
    args = parser.parse_args()
    config = build_config()
    cuda = not args.no_cuda and shutil.which("nvcc") is not None
    if not args.no_cuda and not cuda:
        print("compile_check: nvcc not found: CUDA sources not compile-checked")

    failed = []
    for wanted in args.torch or ["installed"]:
        if wanted == "installed":
            version, include = installed_headers()
        else:
            version = config["EXTENSION_MIN_TORCH_STR"] if wanted == "oldest" else wanted
            include = fetch_headers(version)
        jobs = checks(include, config, cuda)
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            results = pool.map(
                lambda job: subprocess.run(job[1], capture_output=True, text=True), jobs
            )
            for (name, _), result in zip(jobs, results, strict=True):
                ok = result.returncode == 0
                print(f"compile_check: torch {version}: {name} {'compiles' if ok else 'FAILS'}")
                if not ok:
                    print(result.stdout + result.stderr)
                    failed.append(f"{name} with torch {version}")
    if failed:
        print("compile_check: failed: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
