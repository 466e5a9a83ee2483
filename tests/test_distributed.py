"""DDP with gloo on 2 CPU processes: replicas stay identical, metrics match one process,
resume gives the weights of an uninterrupted run, and a run resumes with another world size."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from convrec.checkpoint_file import load_checkpoint
from convrec.cli import main
from convrec.training import TrainConfig, train

TINY = {"num_users": 160, "num_items": 300, "mean_length": 10, "max_length": 30, "seed": 5}
SETTINGS = {"synthetic": TINY, "d_model": 16, "max_len": 20, "batch_size": 32, "patience": 9}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    steps = []

    def same_weights_everywhere(model: torch.nn.Module) -> None:
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(gathered[0], g) for g in gathered), "replicas diverged"
        steps.append(1)

    config = TrainConfig(**SETTINGS, epochs=2, loss="sampled", negatives=20)
    train(config, out, progress=False, echo=lambda _m: None, step_callback=same_weights_everywhere)
    assert len(steps) > 4


@pytest.mark.slow
def test_replicas_identical_after_every_step(tmp_path: pathlib.Path) -> None:
    mp.spawn(_replica, args=(2, _free_port(), str(tmp_path / "run")), nprocs=2, join=True)
    assert (tmp_path / "run" / "metrics.json").is_file()


def _torchrun(*args: str) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "convrec",
        "train",
        *args,
        "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_metrics_and_resume(tmp_path: pathlib.Path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SETTINGS))
    _torchrun("--config", str(config), "--epochs", "2", "--out", str(tmp_path / "straight"))
    # (b) the sharded evaluation equals a single-process evaluation of the same checkpoint
    capsys.readouterr()
    main(["evaluate", "--checkpoint", str(tmp_path / "straight" / "best.pt"), "--json"])
    single = json.loads(capsys.readouterr().out)
    assert single == json.loads((tmp_path / "straight" / "metrics.json").read_text())
    # (c) one epoch, then resume to two: the same final weights as the uninterrupted run
    _torchrun("--config", str(config), "--epochs", "1", "--out", str(tmp_path / "resumed"))
    _torchrun(
        "--config", str(config), "--epochs", "2", "--out", str(tmp_path / "resumed"), "--resume"
    )
    a = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a run started with 2 processes continues with 1
    summary = train(
        TrainConfig(**SETTINGS, epochs=3),
        tmp_path / "resumed",
        resume=True,
        progress=False,
        echo=lambda _m: None,
    )
    assert summary["epochs_trained"] == 3 and summary["processes"] == 1
