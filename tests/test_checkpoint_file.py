"""Loading a checkpoint never runs code: a pickle that would create a file is refused by every
entry point that reads checkpoints, and foreign files get one plain line."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch

from convrec.checkpoint_file import CheckpointError, load_checkpoint
from convrec.cli import main
from convrec.serving import Recommender
from convrec.training import TrainConfig, train

TINY = {"num_users": 60, "num_items": 200, "mean_length": 8, "max_length": 20, "seed": 3}


class _CreatesAFile:
    """Unpickling this calls ``os.makedirs(target)``: proof that loading ran code."""

    def __init__(self, target: pathlib.Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def _malicious(path: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    torch.save({"model_spec": _CreatesAFile(target), "model": {}}, path)
    return path


@pytest.fixture
def target(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "created-by-the-pickle"


def test_load_checkpoint_refuses_a_pickle_that_runs_code(tmp_path, target) -> None:
    path = _malicious(tmp_path / "evil.pt", target)
    with pytest.raises(CheckpointError, match=r"evil\.pt is refused: it asks to run .*makedirs"):
        load_checkpoint(path)
    assert not target.exists()


def test_serving_refuses_a_pickle_that_runs_code(tmp_path, target) -> None:
    path = _malicious(tmp_path / "evil.pt", target)
    with pytest.raises(CheckpointError, match="is refused"):
        Recommender(path)
    assert not target.exists()


@pytest.mark.parametrize("command", ["recommend", "evaluate", "export"])
def test_cli_refuses_a_pickle_that_runs_code(tmp_path, target, command, capsys) -> None:
    path = _malicious(tmp_path / "evil.pt", target)
    out = str(tmp_path / "m.pt2")
    args = {
        "recommend": ["recommend", "--checkpoint", str(path), "--history", "1 2"],
        "evaluate": ["evaluate", "--checkpoint", str(path)],
        "export": ["export", "--checkpoint", str(path), "--format", "torch-export", "--out", out],
    }[command]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 3  # a bad input file, one line
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("convrec: error: ") and "is refused" in line
    with pytest.raises(CheckpointError, match="is refused"):
        main([*args, "--debug"])
    assert not target.exists()


def test_resume_refuses_a_pickle_that_runs_code(tmp_path, target) -> None:
    config = TrainConfig(synthetic=TINY, epochs=1, d_model=8, max_len=10, backend="reference")
    _malicious(tmp_path / "last.pt", target)
    with pytest.raises(CheckpointError, match="is refused"):
        train(config, tmp_path, resume=True, progress=False, echo=lambda _m: None)
    assert not target.exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint at all", json.dumps({"model_spec": {}}).encode(), b"PK\x03\x04xx"],
    ids=["empty", "text", "json", "broken-zip"],
)
def test_foreign_files_are_not_checkpoints(tmp_path, content) -> None:
    path = tmp_path / "foreign.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"foreign\.pt is not a convrec checkpoint"):
        load_checkpoint(path)


def test_a_torch_file_without_a_model_is_not_a_checkpoint(tmp_path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="no model spec"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
