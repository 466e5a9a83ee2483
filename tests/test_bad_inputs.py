"""Hardening (issue 20): every bad input is answered by one line naming the problem, with an
exit code by kind, before any work, and nothing is written or overwritten. The cases here are
listed in docs/bad_inputs.md; tensor inputs are covered by tests/test_checks.py."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from convrec.checkpoint_file import CheckpointError, load_checkpoint
from convrec.cli import EXIT_INPUT, EXIT_OUTPUT, EXIT_USAGE, build_parser, main
from convrec.serving import Recommender
from convrec.serving.export import ExportError
from convrec.training import TrainConfig, train
from convrec.training.run_folder import RunFolder, RunFolderError

TINY = {"num_users": 60, "num_items": 300, "mean_length": 8, "max_length": 20, "seed": 3}


def _quiet(_message: str) -> None:
    pass


def _fails(argv: list[str], capsys, code: int, *fragments: str) -> str:
    """Run the CLI in-process: it must exit with ``code`` and one line naming the problem."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert info.value.code == code, err
    assert len(lines) == 1 and lines[0].startswith("convrec: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _write_s3rec(folder: pathlib.Path, name: str = "Tiny", items: int = 30) -> pathlib.Path:
    """A small S3-Rec dataset (fewer than 100 items: the sampled protocol cannot run)."""
    lines = []
    for user in range(1, 41):
        length = 4 + user % 5
        lines.append(
            f"{user} " + " ".join(str(1 + (user * 7 + j * 3) % items) for j in range(length))
        )
    (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return folder / name


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> pathlib.Path:
    """One tiny trained run (best.pt, last.pt, ...) that the serving cases read."""
    out = tmp_path_factory.mktemp("run") / "out"
    config = TrainConfig(synthetic=TINY, epochs=1, d_model=8, max_len=10, backend="reference")
    train(config, out, progress=False, echo=_quiet)
    return out


# ---------------------------------------------------------------------------- data files


@pytest.mark.parametrize(
    ("content", "path_suffix", "fragments"),
    [
        ("1 2 3 4\n2 x 3 4\n", "", ["Bad.txt:2: item id 'x' is not an integer"]),
        ("1 2 3 4\n1 3 4 5\n", "", ["Bad.txt:2: user 1 already listed on line 1"]),
        ("1 2 3 4\n", ".txt", ["is an S3-Rec sequence file: pass its prefix", "Bad"]),
        ("1 2 3 4\n", "-missing", ["does not exist"]),
    ],
    ids=["item-not-integer", "duplicate-user", "txt-instead-of-prefix", "missing"],
)
def test_bad_data_files(tmp_path, capsys, content, path_suffix, fragments) -> None:
    (tmp_path / "Bad.txt").write_text(content)
    out = tmp_path / "out"
    data = str(tmp_path / "Bad") + path_suffix
    _fails(["train", "--data", data, "--out", str(out)], capsys, EXIT_INPUT, *fragments)
    assert not out.exists()  # an early failure leaves no half-made folder


def test_bad_attribute_file(tmp_path, capsys) -> None:
    prefix = _write_s3rec(tmp_path)
    (tmp_path / "Tiny_item2attributes.json").write_text('{"1": [1,')
    out = tmp_path / "a" / "b"
    _fails(
        ["train", "--data", str(prefix), "--out", str(out)],
        capsys,
        EXIT_INPUT,
        "Tiny_item2attributes.json:1: invalid JSON",
    )
    assert not (tmp_path / "a").exists()  # parents it made are gone too


# ---------------------------------------------------------------------------- config files


@pytest.mark.parametrize(
    ("name", "text", "fragments"),
    [
        ("c.toml", 'epochs = "two"\n', ["c.toml: epochs must be an integer, got 'two'"]),
        ("c.toml", "epochs = 1.5\n", ["c.toml: epochs must be an integer, got 1.5"]),
        ("c.toml", "max_len = true\n", ["c.toml: max_len must be an integer, got True"]),
        ("c.toml", "epochs = \n", ["c.toml: invalid TOML"]),
        ("c.json", '{"epochs": 2', ["c.json:1: invalid JSON"]),
        ("c.json", "[1, 2]", ["c.json: expected a JSON object"]),
        ("c.json", '{"colour": "red"}', ["c.json: unknown configuration keys: colour"]),
        ("c.yaml", "epochs: 2\n", ["c.yaml: configuration files must end in .json or .toml"]),
        ("c.json", '{"readouts": "attention"}', ["readouts must be a list of strings"]),
        ("c.json", '{"levels": [[2, 3]]}', ["levels: level 0: stride 3 > kernel 2"]),
        ("c.json", '{"lr": "fast"}', ["c.json: lr must be a number, got 'fast'"]),
        ("c.json", '{"synthetic": [1]}', ["synthetic must be a table of options"]),
    ],
    ids=[
        "int-as-string",
        "int-as-float",
        "int-as-bool",
        "toml-syntax",
        "json-syntax",
        "json-not-object",
        "unknown-key",
        "wrong-suffix",
        "list-as-string",
        "levels-range",
        "float-as-string",
        "table-as-list",
    ],
)
def test_bad_config_files(tmp_path, capsys, name, text, fragments) -> None:
    (tmp_path / name).write_text(text)
    out = tmp_path / "out"
    argv = ["train", "--config", str(tmp_path / name), "--out", str(out)]
    _fails(argv, capsys, EXIT_USAGE, *fragments)
    assert not out.exists()


def test_missing_config_file(tmp_path, capsys) -> None:
    argv = ["train", "--config", str(tmp_path / "none.toml"), "--out", str(tmp_path / "out")]
    _fails(argv, capsys, EXIT_INPUT, "none.toml does not exist")
    assert not (tmp_path / "out").exists()


def test_a_flag_beats_a_bad_file_value_and_names_itself(tmp_path, capsys) -> None:
    (tmp_path / "c.json").write_text('{"patience": 3}')
    argv = ["train", "--config", str(tmp_path / "c.json"), "--patience", "0"]
    _fails([*argv, "--out", str(tmp_path / "out")], capsys, EXIT_USAGE, "--patience must be >= 1")


# ---------------------------------------------------------------------------- train flags


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--patience", "0"], ["--patience must be >= 1, got 0"]),
        (["--min-length", "0"], ["--min-length must be >= 3"]),
        (["--k-core", "0"], ["--k-core must be >= 1"]),
        (["--grad-clip", "-1"], ["--grad-clip must be >= 0"]),
        (["--time-budget", "-5"], ["--time-budget must be > 0 seconds"]),
        (["--select", "full/NDCG@11"], ["'full/NDCG@11' is not a metric", "NDCG@10"]),
        (["--protocols", "full", "--select", "sampled/HR@10"], ["PROTOCOL in full and"]),
        (["--protocols", "fast"], ["--protocols must be one or more of full, sampled"]),
        (["--lr", "nan"], ["--lr must be > 0, got nan"]),
        (["--dropout", "1.5"], ["--dropout must be in [0, 1)"]),
        (["--d-model", "16", "--heads", "3"], ["d_model=16 is not divisible by heads=3"]),
        (["--epochs", "0"], ["--epochs must be >= 1"]),
        (["--seed", "-1"], ["--seed must be in [0, 2**63)"]),
        (["--readout", "attention", "--model", "sasrec"], ["readouts are a ConvRec setting"]),
        (["--threads", "0"], ["--threads must be >= 1"]),
        (["--window-step", "5"], ["--window-step must come with train_sampling='all-positions'"]),
        (
            ["--model", "sasrec", "--train-sampling", "all-positions", "--window-step", "60"],
            ["--window-step must be in [1, max_len=50], got 60"],
        ),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v[0].startswith("--") else None,
)
def test_bad_train_flags(tmp_path, capsys, flags, fragments) -> None:
    out = tmp_path / "out"
    _fails(["train", *flags, "--out", str(out)], capsys, EXIT_USAGE, *fragments)
    assert not out.exists()


def test_unwritable_out_is_found_before_data_load(tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    _fails(
        ["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "file" / "run")],
        capsys,
        EXIT_OUTPUT,
        "cannot create",
    )
    _fails(
        ["train", "--out", str(tmp_path / "file")], capsys, EXIT_OUTPUT, "is a file, not a folder"
    )


def test_a_second_writer_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    holder = RunFolder(out)
    holder.acquire()  # another run holds the folder
    try:
        (out / "log.csv").write_text("theirs")
        before = _snapshot(out)
        _fails(
            ["train", "--out", str(out)],
            capsys,
            EXIT_OUTPUT,
            "is in use by another convrec run",
            f"process {os.getpid()}",
        )
        assert _snapshot(out) == before
    finally:
        holder.release(failed=False)
    holder.acquire()
    try:
        with pytest.raises(RunFolderError, match="in use"):  # the same through the API
            train(TrainConfig(synthetic=TINY), out, progress=False, echo=_quiet)
    finally:
        holder.release(failed=False)


def test_an_existing_run_is_not_overwritten(run, tmp_path, capsys) -> None:
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    before = _snapshot(out)
    _fails(["train", "--out", str(out)], capsys, EXIT_OUTPUT, "already holds a run", "--resume")
    _fails(
        ["train", "--out", str(out), "--resume", "--d-model", "12"],
        capsys,
        1,
        "cannot resume: the configuration differs",
    )
    assert _snapshot(out) == before
    _fails(
        ["train", "--resume", "--out", str(tmp_path / "new")], capsys, EXIT_INPUT, "cannot resume"
    )
    assert not (tmp_path / "new").exists()


def test_a_checkpoint_of_another_parameter_layout_does_not_resume(run, tmp_path) -> None:
    """Optimizer state for more tensors than the model has (as before the level stack was
    packed into one parameter): a plain error naming the file, nothing written."""
    out = tmp_path / "old"
    shutil.copytree(run, out)
    last = out / "last.pt"
    payload = torch.load(last, weights_only=True)
    group = payload["optimizer"]["param_groups"][0]
    group["params"] = [*group["params"], len(group["params"])]
    torch.save(payload, last)
    before = _snapshot(out)
    config = TrainConfig(synthetic=TINY, epochs=2, d_model=8, max_len=10, backend="reference")
    with pytest.raises(CheckpointError, match=r"cannot resume .*last\.pt: .*parameter layout"):
        train(config, out, resume=True, progress=False, echo=_quiet)
    assert _snapshot(out) == before


def test_stale_temporaries_are_cleaned_and_files_honour_the_umask(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".last.pt.k1ll3d").write_bytes(b"half")
    (out / ".keep.me").write_bytes(b"theirs")
    folder = RunFolder(out)
    folder.acquire()
    folder.release(failed=False)
    assert not (out / ".last.pt.k1ll3d").exists() and (out / ".keep.me").exists()
    from convrec.training.checkpoint import save_json

    old = os.umask(0o022)
    try:
        save_json(out / "metrics.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((out / "metrics.json").stat().st_mode) == 0o644


# ---------------------------------------------------------------------------- other commands


def test_bad_export_requests(run, tmp_path, capsys) -> None:
    best = str(run / "best.pt")
    cases = [
        (["--format", "onnx", "--out", str(tmp_path / "m.pt2")], EXIT_USAGE, "name it m.onnx"),
        (["--format", "torch-export", "--out", str(tmp_path / "m")], EXIT_USAGE, "no suffix"),
        (["--format", "onnx", "--out", str(tmp_path / "m.onnx"), "-k", "0"], EXIT_USAGE, ">= 1"),
        (["--format", "onnx", "--out", str(tmp_path)], EXIT_USAGE, "writes a .onnx file"),
    ]
    for flags, code, fragment in cases:
        _fails(["export", "--checkpoint", best, *flags], capsys, code, fragment)
    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint")
    out = tmp_path / "m.pt2"
    argv = ["export", "--checkpoint", str(tmp_path / "foreign.pt"), "--format", "torch-export"]
    _fails([*argv, "--out", str(out)], capsys, EXIT_INPUT, "is not a convrec checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.pt"]


def test_bad_recommend_and_evaluate_requests(run, tmp_path, capsys) -> None:
    best = str(run / "best.pt")
    rec = ["recommend", "--checkpoint", best]
    _fails([*rec, "--history", "  "], capsys, EXIT_USAGE, "--history is empty")
    _fails([*rec, "--history", "1", "-k", "0"], capsys, EXIT_USAGE, "-k/--k must be >= 1")
    _fails([*rec, "--history", "1 99999"], capsys, 1, "unknown item ids in --history: 99999")
    _fails([*rec, "--user", "nobody"], capsys, 1, "user 'nobody' is not in synthetic")
    _fails(
        ["evaluate", "--checkpoint", str(tmp_path / "none.pt")],
        capsys,
        EXIT_INPUT,
        "does not exist",
    )
    _fails(["demo", "--seconds", "0"], capsys, EXIT_USAGE, "--seconds must be > 0")


def test_small_dataset_relative_path_outputs_and_missing_data(tmp_path, capsys, monkeypatch):
    """Fewer than 100 items train with --protocols full; the data path is stored resolved, so
    evaluate works from another folder; when the data is gone the error suggests --data."""
    (tmp_path / "data").mkdir()
    _write_s3rec(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    base = ["train", "--data", "data/Tiny", "--epochs", "1", "--d-model", "8", "--no-progress"]
    _fails([*base, "--out", "small"], capsys, 1, "--protocols full")
    assert not (tmp_path / "small").exists()
    old = os.umask(0o022)
    try:
        main([*base, "--protocols", "full", "--out", "small", "--threads", "1"])
    finally:
        os.umask(old)
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    assert config["data"] == str(tmp_path / "data" / "Tiny") and config["protocols"] == ["full"]
    assert set(json.loads((tmp_path / "small" / "metrics.json").read_text())) == {
        f"full/{m}" for m in ("HR@1", "HR@5", "HR@10", "HR@20", "NDCG@1", "NDCG@5")
    } | {"full/NDCG@10", "full/NDCG@20", "full/MRR"}
    for name in ("best.pt", "last.pt", "log.csv", "config.json", "summary.json"):
        assert stat.S_IMODE((tmp_path / "small" / name).stat().st_mode) == 0o644, name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    main(["evaluate", "--checkpoint", "../small/best.pt", "--protocol", "full", "--json"])
    shutil.move(tmp_path / "data", tmp_path / "moved")
    _fails(
        ["recommend", "--checkpoint", "../small/best.pt", "--user", "1"],
        capsys,
        EXIT_INPUT,
        "does not exist (the checkpoint's training data): pass --data PATH",
    )
    main(
        ["recommend", "--checkpoint", "../small/best.pt", "--user", "1", "--data", "../moved/Tiny"]
    )
    # fewer items are left than asked for: fewer rows, never an excluded item with -inf
    capsys.readouterr()
    main(["recommend", "--checkpoint", "../small/best.pt", "--history", "1 2 3", "-k", "1000"])
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    items = len(load_checkpoint(tmp_path / "small" / "best.pt")["item_ids"]) - 1
    assert len(rows) == items - 3 and "-inf" not in "".join(rows)


# ---------------------------------------------------------------------------- serving calls


def test_bad_serving_calls(run, tmp_path) -> None:
    recommender = Recommender(run / "best.pt")
    item = recommender.item_ids[1]
    with pytest.raises(TypeError, match=r"history 0 is str '12', not a list of item ids"):
        recommender.recommend(["12", "873"])
    with pytest.raises(TypeError, match="histories must be a list of histories"):
        recommender.recommend("12 873")
    with pytest.raises(TypeError, match="history 0 is int"):
        recommender.recommend([12, 873])
    with pytest.raises(TypeError, match="k must be an integer"):
        recommender.recommend([[item]], k=2.5)
    with pytest.raises(ValueError, match=r"k must be in \[1, 100\]"):
        recommender.recommend([[item]], k=0)
    with pytest.raises(ValueError, match="holds unknown item ids"):
        recommender.recommend([["no-such-item"]])
    # more than the items left: fewer come back, none of them seen, none scored -inf
    small = Recommender(run / "best.pt", max_k=1000)
    history = small.item_ids[1:-3]
    (top,) = small.recommend([history], k=small.meta["k"])
    assert sorted(i for i, _ in top) == sorted(small.item_ids[-3:])
    assert all(score > float("-inf") for _, score in top)
    for name, content in [
        ("x.pt2", b"PK\x03\x04broken"),
        ("x.onnx", b"\x00garbage"),
        ("y.pt", b""),
    ]:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ExportError, match=r"x.pt2 is not a convrec export"):
        Recommender(tmp_path / "x.pt2")
    with pytest.raises(ExportError, match=r"x.onnx is not a convrec export"):
        Recommender(tmp_path / "x.onnx")
    with pytest.raises(ValueError, match=r"y.pt is not a convrec checkpoint"):
        Recommender(tmp_path / "y.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Recommender(tmp_path / "missing.pt2")


def test_an_export_without_convrec_metadata_is_refused(tmp_path) -> None:
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.ones(1, 2),))
    torch.export.save(program, str(tmp_path / "foreign.pt2"))
    with pytest.raises(ExportError, match=r"no convrec\.json metadata"):
        Recommender(tmp_path / "foreign.pt2")


def test_export_is_quiet_and_atomic(run, tmp_path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    capsys.readouterr()
    main(["export", "--checkpoint", str(run / "best.pt"), "--format", "onnx", "--out", str(out)])
    captured = capsys.readouterr()
    assert captured.out == f"wrote {out}\n" and captured.err == ""
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    assert Recommender(out).recommend([[Recommender(out).item_ids[1]]], k=3)


# ---------------------------------------------------------------------------- the process


def test_no_traceback_in_a_real_process(tmp_path) -> None:
    (tmp_path / "Bad.txt").write_text("1 2 3\n2 x 3\n")
    argv = [sys.executable, "-m", "convrec", "train", "--data", str(tmp_path / "Bad")]
    result = subprocess.run([*argv, "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == EXIT_INPUT
    assert (
        result.stderr
        == "convrec: error: " + f"{tmp_path}/Bad.txt:2: item id 'x' is not an integer\n"
    )
    result = subprocess.run(
        [*argv, "--out", str(tmp_path / "o"), "--debug"], capture_output=True, text=True
    )
    assert (
        result.returncode == 1
        and "Traceback" in result.stderr
        and "DataFormatError" in result.stderr
    )
    assert not (tmp_path / "o").exists()


def test_ctrl_c_stops_cleanly(monkeypatch, tmp_path, capsys) -> None:
    import convrec.training.trainer as trainer

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "load_training_data", interrupted)
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(tmp_path / "out")])
    assert info.value.code == 130 and capsys.readouterr().err == "convrec: interrupted\n"
    assert not (tmp_path / "out").exists()


def test_only_rank_0_prints_the_metrics(monkeypatch, tmp_path, capsys) -> None:
    import convrec.training.trainer as trainer

    monkeypatch.setattr(trainer, "train", lambda *a, **k: {"test": {"full/HR@10": 0.5}})
    monkeypatch.setenv("RANK", "1")
    main(["train", "--out", str(tmp_path / "out")])
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    main(["train", "--out", str(tmp_path / "out")])
    assert json.loads(capsys.readouterr().out) == {"full/HR@10": 0.5}


def test_every_option_has_help_and_version(capsys) -> None:
    parser = build_parser()
    subparsers = [parser]
    while subparsers:
        current = subparsers.pop()
        for action in current._actions:
            if action.choices and isinstance(action.choices, dict):
                subparsers += list(action.choices.values())
            elif action.option_strings and action.dest not in ("help", "debug"):
                assert action.help, (current.prog, action.option_strings)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("convrec ")


# ---------------------------------------------------------------------------- time budget


def test_time_budget_stops_mid_epoch_and_resumes_deterministically(tmp_path) -> None:
    config = dict(synthetic=TINY, d_model=8, max_len=10, batch_size=8, backend="reference")
    steps = []
    stopped = TrainConfig(epochs=3, time_budget=1e-6, **config)
    summary = train(
        stopped, tmp_path / "a", progress=False, echo=_quiet, step_callback=steps.append
    )
    assert len(steps) == 1 and summary["epochs_trained"] == 1  # one step, then it stopped
    assert summary["stopped_by"] == "time_budget"
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    more = TrainConfig(epochs=2, **config)
    for name in ("a", "b"):
        train(more, tmp_path / name, resume=True, progress=False, echo=_quiet)
    a, b = (load_checkpoint(tmp_path / n / "last.pt") for n in ("a", "b"))
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["train"], "the following arguments are required: --out"),
        (["train", "--model", "xyz", "--out", "o"], "argument --model: invalid choice: 'xyz'"),
        (["train", "--epochs", "two", "--out", "o"], "argument --epochs: invalid int value"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_a_bad_command_line_is_one_line(argv, fragment, capsys) -> None:
    """argparse's own errors too: one line naming the flag, not the whole usage."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and fragment in lines[0], lines
