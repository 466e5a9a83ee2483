"""The accuracy benchmark: plans, shared runs, resumption, the report's verdicts, bad plans."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks.accuracy import collect, load_plan, run_folder, run_plans, write_report

PLAN = """
dataset = "Toy"
data = "s3rec/Toy"
seeds = [0, 1]
notes = ["A toy plan."]

[published.full]
Paper = [0.5, 0.25]

[common]
max_len = 10
d_model = 8
epochs = 2
batch_size = 64

[models.convrec]
model = "convrec"
train_sampling = "all-prefixes"
dropout = 0.2

[models.sasrec]
model = "sasrec"
train_sampling = "all-positions"

[variants.same-as-final]
model = "convrec"
train_sampling = "all-prefixes"
dropout = 0.2
weight_decay = 0.0  # the default, spelled out

[variants.random-cut]
model = "convrec"
dropout = 0.2

[variants.sasrec-wd]
model = "sasrec"
train_sampling = "all-positions"
weight_decay = 0.1
"""


def _toy_data(root: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    folder = root / "s3rec"
    folder.mkdir(parents=True)
    lines, items = [], set()
    for user in range(1, 61):
        start = int(rng.integers(1, 150))
        sequence = range(start, start + int(rng.integers(5, 15)))
        items.update(sequence)
        lines.append(" ".join(map(str, [user, *sequence])))
    (folder / "Toy.txt").write_text("\n".join(lines) + "\n")
    attributes = {str(i): [i % 5 + 1, i % 3 + 6] for i in sorted(items)}
    (folder / "Toy_item2attributes.json").write_text(json.dumps(attributes))


def _mean(rows: list[dict], name: str, selected_on: str, metric: str) -> float:
    """Mean test ``metric`` of the runs of ``name`` selected on ``selected_on``."""
    runs = [r for r in rows if r["name"] == name and r["selected_on"] == selected_on]
    return float(np.mean([r[f"test/{metric}"] for r in runs]))


@pytest.mark.slow
def test_plan_runs_once_and_reports(tmp_path: pathlib.Path) -> None:
    _toy_data(tmp_path / "data")
    (tmp_path / "toy.toml").write_text(PLAN)
    plan = load_plan(tmp_path / "toy.toml", tmp_path / "data")
    runs = tmp_path / "runs"
    # the variant with the final settings shares the final model's seed-0 folder (settings at
    # their default do not count, so adding a setting to TrainConfig keeps existing runs)
    assert run_folder(runs, plan, "same-as-final", 0) == run_folder(runs, plan, "convrec", 0)
    assert run_folder(runs, plan, "convrec", 0) != run_folder(runs, plan, "convrec", 1)
    # each final model is trained once per protocol, early-stopped on that protocol
    full, sampled = (run_folder(runs, plan, "convrec", 0, p) for p in ("full", "sampled"))
    assert full != sampled
    run_plans([plan], runs, jobs=2)
    assert len(list((runs / "Toy").iterdir())) == 10  # 2 models x 2 seeds x 2 protocols + 2
    stamps = {p: p.stat().st_mtime for p in (runs / "Toy").glob("*/summary.json")}
    run_plans([plan], runs, jobs=1)  # everything finished: nothing is trained again
    assert {p: p.stat().st_mtime for p in stamps} == stamps
    for folder, protocol in ((full, "full"), (sampled, "sampled")):
        with open(folder / "log.csv") as f:
            log = [float(row[f"valid/{protocol}/NDCG@10"]) for row in csv.DictReader(f)]
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["best_epoch"] == 1 + int(np.argmax(log))
        assert summary[f"best_valid/{protocol}/NDCG@10"] == pytest.approx(max(log))

    rows = collect(plan, runs)
    finals = [(n, s, p) for n in ("convrec", "sasrec") for s in (0, 1) for p in ("full", "sampled")]
    variants = [("random-cut", 0, "full"), ("same-as-final", 0, "full"), ("sasrec-wd", 0, "full")]
    assert sorted((r["name"], r["seed"], r["selected_on"]) for r in rows) == sorted(
        finals + variants
    )
    assert all(0 <= r["test/full/NDCG@10"] <= r["test/full/HR@10"] <= 1 for r in rows)
    text = write_report([plan], runs, tmp_path / "out", "test command")
    assert "| full ranking | Paper (published) | | 0.5000 | 0.2500 |" in text
    assert "\n- A toy plan.\n" in text
    verdicts = [line for line in text.splitlines() if line.startswith("- full ranking")]
    assert len(verdicts) == 4  # HR and NDCG against Paper and against our sasrec
    sampled_verdicts = [line for line in text.splitlines() if line.startswith("- 99 sampled")]
    assert len(sampled_verdicts) == 2  # no published sampled numbers: our sasrec only
    # under the sampled protocol both selections are listed, the protocol's own in bold
    assert "| 99 sampled negatives | **convrec** (ours) | 99 sampled negatives |" in text
    assert "| 99 sampled negatives | convrec (ours) | full ranking |" in text
    mine, theirs = (_mean(rows, name, "sampled", "sampled/HR@10") for name in ("convrec", "sasrec"))
    word = "beats" if mine > theirs else "does NOT beat"
    assert f"- 99 sampled negatives, HR@10: convrec {mine:.4f} {word} our sasrec" in text
    convrec_hr = _mean(rows, "convrec", "full", "full/HR@10")
    word = "beats" if convrec_hr > 0.5 else "does NOT beat"
    assert f"HR@10: convrec {convrec_hr:.4f} {word} Paper (published)" in text
    # each final model is checked against the best variant of its own model
    variants = [r for r in rows if r["role"] == "variant" and r["name"] != "sasrec-wd"]
    best = max(variants, key=lambda r: r["valid/full/NDCG@10"])["name"]
    uses = "uses" if best == "same-as-final" else "does NOT use"
    assert f"The final convrec {uses} the settings of the best convrec variant, {best}." in text
    assert f"| {best} (best convrec) |" in text
    sasrec_choice = "The final sasrec does NOT use the settings of the best sasrec variant"
    assert f"{sasrec_choice}, sasrec-wd." in text
    assert "| sasrec-wd (best sasrec) |" in text
    with open(tmp_path / "out" / "accuracy.csv") as f:
        assert len(list(csv.DictReader(f))) == 11


@pytest.mark.slow
def test_a_failed_run_is_named_and_the_others_finish(tmp_path: pathlib.Path, capsys) -> None:
    _toy_data(tmp_path / "data")
    (tmp_path / "toy.toml").write_text(PLAN)
    plan = load_plan(tmp_path / "toy.toml", tmp_path / "data")
    runs = tmp_path / "runs"
    broken = run_folder(runs, plan, "convrec", 0)
    broken.mkdir(parents=True)
    (broken / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=r"1 run\(s\) failed:\nToy convrec seed 0: "):
        run_plans([plan], runs, jobs=1, names=["convrec"])
    assert "[Toy convrec seed 0] failed: " in capsys.readouterr().out
    assert (run_folder(runs, plan, "convrec", 1) / "summary.json").exists()
    assert not (broken / "summary.json").exists()


def test_bad_plans_name_the_problem(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('dataset = "X"\ndata = "x"\n')
    with pytest.raises(ValueError, match=r"bad.toml: missing keys seeds, models"):
        load_plan(path, tmp_path)
    path.write_text(PLAN.replace("dropout = 0.2\n\n[models.sasrec]", "colour = 1\n[models.sasrec]"))
    with pytest.raises(ValueError, match="unknown configuration keys: colour"):
        load_plan(path, tmp_path)
    path.write_text(PLAN.replace("batch_size = 64", "batch_size = 64\nselect = 'full/HR@10'"))
    with pytest.raises(ValueError, match=r"\[common\] sets select, which the benchmark fixes"):
        load_plan(path, tmp_path)
    path.write_text("dataset = \n")
    with pytest.raises(ValueError, match=r"bad\.toml"):
        load_plan(path, tmp_path)


def test_a_locked_run_is_left_to_its_owner(tmp_path: pathlib.Path) -> None:
    import fcntl

    from benchmarks.accuracy import _train_one

    _toy_data(tmp_path / "data")
    (tmp_path / "toy.toml").write_text(PLAN)
    plan = load_plan(tmp_path / "toy.toml", tmp_path / "data")
    folder = run_folder(tmp_path / "runs", plan, "convrec", 0)
    folder.mkdir(parents=True)
    with open(folder / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert _train_one(plan.config("convrec", 0), folder, "toy", 1) is None
    assert not (folder / "last.pt").exists()


def test_command_line_names_bad_selections(tmp_path: pathlib.Path) -> None:
    from benchmarks.accuracy import main

    (tmp_path / "toy.toml").write_text(PLAN)
    plan = str(tmp_path / "toy.toml")
    common = [plan, "--data-root", str(tmp_path), "--runs", str(tmp_path)]
    with pytest.raises(SystemExit, match="no model or variant named bert"):
        main([*common, "--only", "bert"])
    with pytest.raises(SystemExit, match="no plan has seed 7"):
        main([*common, "--seeds", "7"])
    with pytest.raises(SystemExit, match="--jobs and --threads must be >= 1, got 0"):
        main([*common, "--jobs", "0"])


def test_data_root_defaults_beside_the_checkout(monkeypatch, tmp_path: pathlib.Path) -> None:
    """$CONVREC_SHARED_DATA wins; without it, shared/data beside the checkout (not a path
    relative to the installed package)."""
    from benchmarks.accuracy import default_data_root

    monkeypatch.setenv("CONVREC_SHARED_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("CONVREC_SHARED_DATA")
    checkout = pathlib.Path(__file__).resolve().parents[1]
    assert default_data_root() == checkout.parent / "shared" / "data"


@pytest.mark.parametrize(
    "path", sorted(pathlib.Path(__file__).parents[1].glob("benchmarks/configs/accuracy/*.toml"))
)
def test_committed_plans_load(path: pathlib.Path, tmp_path) -> None:
    """Every committed plan is a valid configuration per entry (no data read), runs 3 seeds, and
    its convrec and sasrec finals differ in folder from each other."""
    plan = load_plan(path, tmp_path)
    assert plan.seeds == [0, 1, 2] and {"convrec", "sasrec"} <= set(plan.models)
    folders = {run_folder(tmp_path, plan, name, 0) for name in plan.models}
    assert len(folders) == len(plan.models)


def _state(pid: int | str) -> tuple[str, int] | None:
    """(state letter, parent pid) of a process from /proc, None once it is gone."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    state = _state(pid)
    return state is not None and state[0] != "Z"  # a zombie has ended


def _live_children(pid: int) -> list[int]:
    pids = [int(p.name) for p in pathlib.Path("/proc").glob("[0-9]*")]
    return [c for c in pids if _alive(c) and _state(c)[1] == pid]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_benchmark_takes_its_workers_along(tmp_path: pathlib.Path) -> None:
    """SIGTERM to the benchmark alone (``pkill -f benchmarks.accuracy``) stops its training
    workers too; before, an orphaned worker kept training and took the next queued run."""
    _toy_data(tmp_path / "data")
    endless = PLAN.replace("epochs = 2", "epochs = 100000\npatience = 100000")
    (tmp_path / "toy.toml").write_text(endless)
    runs = tmp_path / "runs"
    script = (
        "import pathlib\n"
        "from benchmarks.accuracy import load_plan, run_plans\n"
        f"plan = load_plan({str(tmp_path / 'toy.toml')!r}, {str(tmp_path / 'data')!r})\n"
        f"run_plans([plan], pathlib.Path({str(runs)!r}), jobs=1, names=['convrec'], seeds=[0])\n"
    )
    root = pathlib.Path(__file__).parents[1]  # where ``benchmarks`` imports from
    bench, workers = subprocess.Popen([sys.executable, "-c", script], cwd=root), []
    try:
        deadline = time.monotonic() + 300
        while not list(runs.glob("*/*/log.csv")):  # a worker is training
            assert bench.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        workers = _live_children(bench.pid)
        assert workers
        bench.send_signal(signal.SIGTERM)
        bench.wait(timeout=60)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, f"workers {workers} outlived the benchmark"
            time.sleep(0.5)
    finally:  # a failed check must not leave a training running forever
        for pid in [bench.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
