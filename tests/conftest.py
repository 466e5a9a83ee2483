"""Shared fixtures: seeded RNG, small attribute tables, the path of the shared real data."""

from __future__ import annotations

import importlib
import os
import pathlib

import pytest
import torch

# Without a GPU the Triton tests run the kernels in Triton's CPU interpreter, which must be
# switched on before triton is imported (importing convrec imports it, through torch._dynamo).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The real datasets live beside the repository (../shared/data); CONVREC_SHARED_DATA overrides.
SHARED_DATA = pathlib.Path(
    os.environ.get(
        "CONVREC_SHARED_DATA", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
    )
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def attribute_lists() -> list[list[int]]:
    """Attributes of items 0..30 (0 = padding): some with none, some with repeated ids."""
    lists: list[list[int]] = [[]]
    for item in range(1, 31):
        if item % 5 == 0:
            lists.append([])
        elif item % 7 == 0:
            lists.append([item % 9, item % 9, (item * 2) % 9])
        else:
            lists.append([item % 9, (item * 4 + 1) % 9])
    return lists


@pytest.fixture
def small_tiles(monkeypatch):
    """Interpreter tiles of 16 rows and 16 channels, so small shapes span several row and
    channel tiles and the weight gradient several partials (the GPU's multi-tile paths)."""
    if torch.cuda.is_available():
        pytest.skip("the GPU runs its own tiles at full size")
    launch = importlib.import_module("convrec.ops.triton.launch")
    monkeypatch.setattr(launch, "_INTERPRETER_ROWS", 16)
    monkeypatch.setattr(launch, "_INTERPRETER_CHANNELS", 16)
    monkeypatch.setattr(launch, "_INTERPRETER_GATHER", (16, 16))
