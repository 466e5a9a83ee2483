"""The whole-stack Triton kernels compile for a Hopper GPU (sm_90) with the GPU launch
configuration: the interpreter runs the kernels' Python, not Triton's type checks, layouts and
register allocation, so without this test a kernel could pass every CPU test and fail to compile
on the first GPU it meets. The compile runs in a subprocess without ``TRITON_INTERPRET`` (which
``tests/conftest.py`` sets), through ``benchmarks/triton_resources.py``."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia.compiler")

KERNELS = {"_stack_forward", "_stack_backward", "_fold_levels", "_unfold_levels", "_sum_partials"}


@pytest.mark.slow
def test_whole_stack_kernels_compile_for_sm90(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    command = [sys.executable, "-m", "benchmarks.triton_resources", "--out", str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "triton_resources.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["kernel"], r["dtype"]) for r in rows} == {
        (k, d) for k in KERNELS for d in ("bf16", "fp32")
    }
    assert all(0 < int(r["registers"]) <= 255 for r in rows)
