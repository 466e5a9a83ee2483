"""The build of convrec._C: csrc/ compiles against the installed torch's headers, and the status
that setup.py records for the runtime (convrec/_build_status.json) round-trips."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from convrec import build_status

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup_module_globals() -> dict:
    return runpy.run_path(str(ROOT / "setup.py"))  # not __main__: builds nothing


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cpp_sources_compile_against_installed_torch():
    # The same check CI runs (.ci/run), C++ only: a few seconds, against this torch's headers.
    result = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "compile_check.py"), "--no-cuda"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "downscale_cpu.cpp compiles" in result.stdout


def test_declared_minimum_matches_target_version(setup_module_globals):
    major, minor = setup_module_globals["EXTENSION_MIN_TORCH"]
    assert setup_module_globals["EXTENSION_MIN_TORCH_STR"] == f"{major}.{minor}.0"
    target = f"(((0ULL + {major}) << 56) | ((0ULL + {minor}) << 48))"
    assert f"-DTORCH_TARGET_VERSION={target}" in setup_module_globals["CXX_FLAGS"]
    assert f"-DTORCH_TARGET_VERSION={target}" in setup_module_globals["NVCC_FLAGS"]


def test_error_summary_picks_the_first_compiler_error(setup_module_globals):
    summary = setup_module_globals["error_summary"]
    gcc = (
        "In file included from csrc/downscale_cpu.cpp:10:\n"
        "csrc/downscale_driver.h:162:3: error: 'X' was not declared in this scope\n"
        "csrc/downscale_driver.h:170:3: error: second\n"
    )
    assert summary(gcc, RuntimeError("exit 1")).startswith("csrc/downscale_driver.h:162:3: error")
    nvcc = 'csrc/downscale_cuda.cu(87): error: identifier "X" is undefined\n'
    assert summary(nvcc, RuntimeError("exit 1")).startswith("csrc/downscale_cuda.cu(87)")
    assert summary("no diagnostics\n", OSError("nvcc missing")) == "OSError: nvcc missing"


def test_status_file_round_trip(setup_module_globals, tmp_path, monkeypatch):
    status = setup_module_globals["new_status"]("2.11.0")
    status["parts"]["cpu"].update(state="built")
    status["parts"]["cuda"].update(state="failed", detail="x.cu(1): error: boom")
    status["warning"] = "convrec._C was built for the CPU only: boom"
    setup_module_globals["write_status"](status, [tmp_path / "a", tmp_path / "b"])
    for directory in ("a", "b"):
        path = tmp_path / directory / setup_module_globals["STATUS_FILE"]
        assert json.loads(path.read_text()) == status
    monkeypatch.setattr(build_status, "STATUS_FILE", tmp_path / "a" / "_build_status.json")
    assert build_status.read() == status
    assert build_status.warning() == "convrec._C was built for the CPU only: boom"


def test_status_reader_without_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr(build_status, "STATUS_FILE", tmp_path / "missing.json")
    assert build_status.read() is None and build_status.warning() is None
    (tmp_path / "missing.json").write_text("not json")
    assert build_status.read() is None
