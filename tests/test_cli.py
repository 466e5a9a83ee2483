"""The command line end to end on tiny synthetic data: train, evaluate, recommend, demo."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from convrec.checkpoint_file import load_checkpoint
from convrec.cli import main
from convrec.ops.dispatch import IMPLEMENTATIONS, extension_status, resolve
from convrec.readouts import READOUTS

TINY = {"num_users": 120, "num_items": 300, "mean_length": 10, "max_length": 30, "seed": 4}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("run")
    config = folder / "config.json"
    config.write_text(json.dumps({"synthetic": TINY, "d_model": 16, "max_len": 20, "epochs": 5}))
    main(
        [
            "train",
            "--config",
            str(config),
            "--epochs",
            "2",
            "--out",
            str(folder / "out"),
            "--no-progress",
            "--input-dropout",
            "0.1",
            *("--readout", "attention"),
            *("--readout", "last_item_skip"),
            *("--readout", "last_item_transition"),
            *("--readout", "last_item_mlp"),
            *("--readout", "last_item_table"),
        ]
    )
    return folder / "out"


def test_train_respects_config_and_flags(run: pathlib.Path) -> None:
    saved = load_checkpoint(run / "last.pt")["config"]
    assert saved["d_model"] == 16 and saved["epochs"] == 2  # the flag beats the file
    assert saved["input_dropout"] == 0.1
    assert saved["readouts"] == list(READOUTS)  # in the registry's order


def test_evaluate_reproduces_metrics_json(run: pathlib.Path, capsys) -> None:
    capsys.readouterr()
    main(["evaluate", "--checkpoint", str(run / "best.pt"), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((run / "metrics.json").read_text())
    main(
        [
            "evaluate",
            "--checkpoint",
            str(run / "best.pt"),
            "--protocol",
            "sampled",
            "--split",
            "valid",
        ]
    )
    table = capsys.readouterr().out
    assert "sampled negatives" in table and "full ranking" not in table


def test_recommend(run: pathlib.Path, capsys) -> None:
    capsys.readouterr()
    main(["recommend", "--checkpoint", str(run / "best.pt"), "--history", "3 7 9", "--k", "4"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "rank\titem\tscore" and len(lines) == 5
    items = [line.split("\t")[1] for line in lines[1:]]
    assert not {"3", "7", "9"} & set(items)
    main(["recommend", "--checkpoint", str(run / "best.pt"), "--user", "1", "--k", "2"])
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    with pytest.raises(SystemExit) as info:
        main(["recommend", "--checkpoint", str(run / "best.pt"), "--history", "3 999"])
    assert info.value.code == 1
    assert capsys.readouterr().err == "convrec: error: unknown item ids in --history: 999\n"


def test_help_everywhere() -> None:
    for command in (
        [], ["train"], ["evaluate"], ["recommend"], ["demo"], ["doctor"], ["bench", "encoder"]
    ):  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "convrec", *command, "--help"], capture_output=True, text=True
        )
        assert result.returncode == 0 and "usage: convrec" in result.stdout


def test_doctor_says_what_runs_where(capsys) -> None:
    """One line per device for the extension and Triton, one per op and device with auto's
    choice; the choices agree with the dispatcher."""
    main(["doctor"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("torch ")
    for device in ("cpu", "cuda"):
        assert sum(line.startswith(f"{device} extension: ") for line in lines) == 1
        assert sum(line.startswith(f"{device} triton: ") for line in lines) == 1
    for op in IMPLEMENTATIONS:
        expected = resolve(op, "auto", torch.device("cpu"))
        assert f"{op} on cpu: auto runs {expected}" in "\n".join(lines)
        assert sum(line.startswith(f"{op} on cuda: auto runs ") for line in lines) == 1
    built = extension_status("cpu") is None
    assert ("cpu extension: built (float32, float64)" in lines) == built


def test_demo(tmp_path: pathlib.Path, capsys) -> None:
    from convrec.demo import run_demo

    summaries = run_demo(tmp_path, seconds=1, progress=False, synthetic=TINY)
    out = capsys.readouterr().out
    assert set(summaries) == {"popularity", "convrec", "sasrec"}
    assert "| convrec |" in out and "| sasrec |" in out and "| popularity |" in out


def test_train_faithful_end_to_end(tmp_path: pathlib.Path) -> None:
    """``--faithful`` through the trainer and both protocols: with the extension built, the
    item encoder's item rows, fused vectors, bags and input block run on it in training."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"synthetic": TINY, "d_model": 16, "max_len": 20}))
    out = tmp_path / "out"
    flags = ["--faithful", "--epochs", "2", "--no-progress", "--out", str(out)]
    main(["train", "--config", str(config), *flags])
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 < metrics["full/NDCG@10"] <= 1.0 and 0.0 < metrics["sampled/NDCG@10"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_trained"] == 2
