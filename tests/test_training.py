"""Training: files written, exact resume, atomic checkpoints, beating popularity, config files."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from convrec.baselines.popularity import Popularity
from convrec.checkpoint_file import load_checkpoint
from convrec.evaluation import evaluate
from convrec.training import TrainConfig, train
from convrec.training import checkpoint as checkpoint_module
from convrec.training.checkpoint import save_checkpoint
from convrec.training.trainer import load_training_data

TINY = {"num_users": 150, "num_items": 300, "mean_length": 12, "max_length": 40, "seed": 1}


def _config(**overrides) -> TrainConfig:
    values = dict(synthetic=TINY, epochs=2, batch_size=64, max_len=20, d_model=16, patience=5)
    return TrainConfig(**(values | overrides))


def _quiet(_message: str) -> None:
    pass


def test_run_writes_everything(tmp_path: pathlib.Path) -> None:
    summary = train(_config(), tmp_path, progress=False, echo=_quiet)
    for name in ("best.pt", "last.pt", "log.csv", "metrics.json", "summary.json"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == summary["test"]
    assert {"full/HR@10", "full/NDCG@10", "sampled/HR@10", "sampled/NDCG@10", "full/MRR"} <= set(
        metrics
    )
    log = (tmp_path / "log.csv").read_text().splitlines()
    assert len(log) == 3 and log[0].startswith("epoch,train_loss,epoch_seconds")
    assert not list(tmp_path.glob(".*.pt.*"))  # no temporary files left behind
    with pytest.raises(FileExistsError, match="--resume"):
        train(_config(), tmp_path, progress=False, echo=_quiet)


@pytest.mark.parametrize("model", ["convrec", "sasrec"])
def test_resume_is_bit_for_bit(tmp_path: pathlib.Path, model: str) -> None:
    straight = _config(model=model, epochs=3, loss="sampled", negatives=20)
    train(straight, tmp_path / "straight", progress=False, echo=_quiet)
    first = _config(model=model, epochs=1, loss="sampled", negatives=20)
    train(first, tmp_path / "resumed", progress=False, echo=_quiet)
    train(straight, tmp_path / "resumed", resume=True, progress=False, echo=_quiet)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["state"]["log"][-1]["train_loss"] == b["state"]["log"][-1]["train_loss"]


def test_resume_refuses_a_different_run(tmp_path: pathlib.Path) -> None:
    train(_config(epochs=1), tmp_path, progress=False, echo=_quiet)
    with pytest.raises(ValueError, match=r"d_model: 16 -> 32"):
        train(_config(d_model=32), tmp_path, resume=True, progress=False, echo=_quiet)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(_config(), tmp_path / "fresh", resume=True, progress=False, echo=_quiet)


def test_a_run_saved_before_a_setting_existed_resumes(tmp_path: pathlib.Path) -> None:
    """A setting missing from the saved configuration had its default when the run was saved."""
    train(_config(epochs=1), tmp_path, progress=False, echo=_quiet)
    last = load_checkpoint(tmp_path / "last.pt")
    del last["config"]["mask_aware"]
    save_checkpoint(tmp_path / "last.pt", last)
    summary = train(_config(epochs=2), tmp_path, resume=True, progress=False, echo=_quiet)
    assert summary["epochs_trained"] == 2
    with pytest.raises(ValueError, match=r"mask_aware: False -> True"):
        train(_config(mask_aware=True), tmp_path, resume=True, progress=False, echo=_quiet)


def test_a_best_checkpoint_from_another_writer_is_refused(tmp_path: pathlib.Path) -> None:
    train(_config(epochs=1), tmp_path, progress=False, echo=_quiet)
    best = load_checkpoint(tmp_path / "best.pt")
    save_checkpoint(tmp_path / "best.pt", best | {"epoch": 7})
    with pytest.raises(RuntimeError, match="holds epoch 7 but the run's best is epoch 1"):
        train(_config(epochs=1), tmp_path, resume=True, progress=False, echo=_quiet)


def test_interrupted_write_keeps_the_old_checkpoint(tmp_path, monkeypatch) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model_spec": {}, "value": 1})

    def crash(payload, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model_spec": {}, "value": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["value"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@pytest.mark.slow
def test_convrec_beats_popularity(tmp_path: pathlib.Path) -> None:
    config = _config(
        synthetic={"num_users": 600, "num_items": 200, "seed": 2},
        epochs=8,
        train_sampling="all-prefixes",
        d_model=32,
    )
    summary = train(config, tmp_path, progress=False, echo=_quiet)
    data = load_training_data(config)
    popularity = Popularity.from_sequences([s[:-2] for s in data.sequences], data.num_items)
    floor = evaluate(popularity, data, "test", max_len=config.max_len)
    for metric in ("full/NDCG@10", "sampled/NDCG@10"):
        assert summary["test"][metric] > floor[metric] + 0.05, (metric, summary["test"], floor)


def test_sasrec_trains_on_every_position(tmp_path: pathlib.Path) -> None:
    config = _config(model="sasrec", train_sampling="all-positions", epochs=2, max_len=8)
    summary = train(config, tmp_path, progress=False, echo=_quiet)
    log = (tmp_path / "log.csv").read_text().splitlines()
    assert len(log) == 3 and summary["epochs_trained"] == 2
    first, second = (float(line.split(",")[1]) for line in log[1:])
    assert second < first  # the loss over every position goes down


def test_streaming_batches_lose_only_shared_padding() -> None:
    """A streaming model trains on batches cut to their longest history: the loss of the cut
    batch equals the full one (float64, no dropout), and no real slot is cut."""
    from convrec import ConvRec
    from convrec.training.losses import all_positions_loss
    from convrec.training.trainer import _without_shared_padding
    from tests.helpers import randomise

    ids = torch.zeros(3, 12, dtype=torch.long)
    ids[0, 9:], ids[1, 7:], ids[2, 11:] = torch.tensor([4, 9, 2]), torch.arange(1, 6), 7
    targets = torch.where(ids != 0, torch.randint(1, 20, ids.shape), 0)
    cut_ids, no_times, cut_targets = _without_shared_padding(ids.numpy(), None, targets.numpy())
    assert cut_ids.shape == (3, 5) and no_times is None
    assert (cut_ids != 0).sum() == (ids != 0).sum()
    model = ConvRec(20, d_model=8, levels=[(2, 2), (3, 3)], streaming=True, dropout=0.0)
    model = randomise(model).double().eval()
    full = all_positions_loss(model, ids, targets, None)
    cut = all_positions_loss(model, torch.from_numpy(cut_ids), torch.from_numpy(cut_targets), None)
    torch.testing.assert_close(cut, full, rtol=1e-12, atol=0)


def test_all_positions_loss_scores_only_trained_slots(tmp_path: pathlib.Path) -> None:
    """Slots whose target is 0 are context: the loss equals the cross-entropy of the scores of
    every real slot restricted to the trained ones (float64), and a run with overlapping
    windows (window_step) trains."""
    from convrec import ConvRec
    from convrec.training.losses import all_positions_loss
    from tests.helpers import randomise

    model = ConvRec(20, d_model=8, levels=[(2, 2), (3, 3)], streaming=True, dropout=0.0)
    model = randomise(model).double().eval()
    ids = torch.randint(1, 21, (3, 9))
    ids[1, :4] = 0
    targets = torch.where(ids != 0, torch.randint(1, 21, ids.shape), 0)
    targets[:, :5] = 0  # context only
    loss = all_positions_loss(model, ids, targets, None)
    every = model.score_positions(ids)
    expected = torch.nn.functional.cross_entropy(
        every[(targets != 0)[ids != 0]], targets[targets != 0]
    )
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    windows = dict(streaming=True, train_sampling="all-positions", window_step=4, max_len=8)
    config = _config(epochs=1, levels=[[2, 2], [2, 2], [2, 2]], **windows)
    summary = train(config, tmp_path, progress=False, echo=_quiet)
    assert summary["epochs_trained"] == 1


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown configuration keys: colour"):
        TrainConfig.from_dict({"colour": "red"})
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(loss="hinge").check()
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        TrainConfig(max_len=0).check()
    assert TrainConfig.from_dict({"max-len": 30}).max_len == 30
    with pytest.raises(ValueError, match=r"all-positions.*causal"):
        TrainConfig(train_sampling="all-positions").check()  # convrec
    with pytest.raises(ValueError, match="loss='sampled'"):
        TrainConfig(model="sasrec", train_sampling="all-positions", loss="sampled").check()
    with pytest.raises(ValueError, match="input_dropout is a ConvRec setting"):
        TrainConfig(model="sasrec", input_dropout=0.2).check()
    with pytest.raises(ValueError, match="readouts are a ConvRec setting"):
        TrainConfig(model="sasrec", readouts=["last_item_skip"]).check()
    with pytest.raises(ValueError, match="unknown readout 'skip'; choose from last_item_skip"):
        TrainConfig(readouts=["skip"]).check()
    with pytest.raises(ValueError, match=r"input_dropout must be in \[0, 1\), got 1.5"):
        TrainConfig(input_dropout=1.5).check()
    with pytest.raises(ValueError, match="window_step must come with train_sampling='all-pos"):
        TrainConfig(window_step=10).check()
    with pytest.raises(ValueError, match=r"window_step must be in \[1, max_len=50\], got 60"):
        TrainConfig(model="sasrec", train_sampling="all-positions", window_step=60).check()
    with pytest.raises(ValueError, match="newest_last lays out a streaming model's open window"):
        TrainConfig(newest_last=True).check()
    # unset, it resolves to the streaming default, so checkpoints store a bool
    assert TrainConfig(streaming=True, train_sampling="all-positions").check().newest_last is True
    assert TrainConfig().check().newest_last is False


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["convrec", "sasrec"])
def test_compiled_training_step_equals_eager(model_name: str) -> None:
    """``train --compile``'s step (the model under torch.compile, custom ops included) gives
    the eager step's loss and gradients; inductor's own dropout generator is switched to
    PyTorch's so both draw the same masks."""
    from torch._inductor import config as inductor_config

    from convrec.registry import build_model
    from convrec.training.factory import model_spec
    from convrec.training.losses import full_softmax_loss
    from convrec.training.trainer import compile_for_training

    config = _config(
        model=model_name, readouts=["last_item_skip"] if model_name == "convrec" else []
    )
    data = load_training_data(config)
    torch.manual_seed(0)
    model = build_model(model_spec(config, data)).train()
    compiled = compile_for_training(model, torch.device("cpu"))
    ids = torch.randint(0, data.num_items + 1, (16, config.max_len))
    targets = torch.randint(1, data.num_items + 1, (16,))
    results = []
    for runner in (model, compiled):
        torch.manual_seed(1)
        with inductor_config.patch(fallback_random=True):
            loss = full_softmax_loss(runner, ids, targets, None)
            grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((loss, grads))
    (eager_loss, eager_grads), (loss, grads) = results
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_training_keeps_freed_large_blocks() -> None:
    """``convrec train`` asks glibc to keep freed memory (``keep_freed_memory``): allocating
    and freeing the same large tensors again then mostly reuses pages instead of faulting new
    ones in, unlike the default, where every cycle faults all of them. In child processes: the
    setting is process-wide."""
    import subprocess
    import sys

    script = """
import resource, sys, torch
from convrec.training.allocator import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    print("unsupported")
    raise SystemExit
def cycle():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a, b = torch.ones(16 * 2**20), torch.ones(20 * 2**20)  # 64 and 80 MiB
    del a, b
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print([cycle() for _ in range(8)])
"""
    faults = {}
    for mode in ("plain", "keep"):
        run = [sys.executable, "-c", script, mode]
        done = subprocess.run(run, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        if done.stdout.strip() == "unsupported":
            pytest.skip("no glibc mallopt here")
        faults[mode] = json.loads(done.stdout)[2:]  # after two cycles of warm-up
    assert sum(faults["plain"]) > 6 * 30_000  # 144 MiB = 36,864 pages faulted per cycle
    assert sum(faults["keep"]) < sum(faults["plain"]) / 3, faults


def test_resuming_a_run_saved_before_newest_last_existed() -> None:
    """A saved configuration without ``newest_last`` used the in-place layout: resuming it
    with ``--no-newest-last`` is allowed; with the new default it is refused by name."""
    from convrec.training.trainer import _check_resumable

    base = dict(streaming=True, train_sampling="all-positions", data="synthetic")
    saved = TrainConfig(**base).check().to_dict()
    del saved["newest_last"]
    _check_resumable(saved, TrainConfig(**base, newest_last=False).check())
    with pytest.raises(ValueError, match="newest_last: False -> True"):
        _check_resumable(saved, TrainConfig(**base).check())
