"""The training loop: AdamW, clipping, validation every epoch, early stopping, checkpoints.

Every epoch draws its samples, dropout and negatives from seeds derived from (seed, epoch), and
``last.pt`` is written atomically at the end of each epoch, so ``resume`` continues bit for bit:
an interrupted run resumed from ``last.pt`` ends with the same weights as an uninterrupted one.

A ``time_budget`` is checked after every optimizer step: when it runs out mid-epoch the epoch
stops there and counts as the run's last (validated, checkpointed, logged). Its ``last.pt``
holds exactly that state, so resuming it with a larger budget continues deterministically with
the next epoch; such a run differs from one that was never stopped.

The run folder is locked for the whole run (``convrec.training.run_folder``), and ``config.json``
(the resolved settings) is written with the first checkpoint.
"""

from __future__ import annotations

import csv
import io
import math
import pathlib
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from convrec.checkpoint_file import CheckpointError, load_checkpoint
from convrec.data.dataset import SequenceDataset
from convrec.data.load import load_dataset
from convrec.data.splits import SequenceIndex, sampled_negatives
from convrec.evaluation.protocols import NEGATIVES_SEED, evaluate
from convrec.readouts import upgrade_flags
from convrec.registry import build_model
from convrec.training.checkpoint import atomic_write, save_checkpoint, save_json
from convrec.training.config import TrainConfig
from convrec.training.distributed import ProcessGroup
from convrec.training.factory import model_spec
from convrec.training.losses import (
    all_positions_loss,
    full_softmax_loss,
    sampled_softmax_loss,
)
from convrec.training.run_folder import RunFolder, RunFolderError, RunFolderInUse

# Settings that may change between a run and its resumption without changing its results.
RESUMABLE_CHANGES = ("epochs", "patience", "time_budget", "eval_batch_size")


def load_training_data(config: TrainConfig) -> SequenceDataset:
    return load_dataset(
        config.data,
        config.format,
        min_length=config.min_length,
        k_core=config.k_core,
        timestamps=config.timestamps,
        synthetic_options=config.synthetic,
    )


def compile_for_training(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` under ``torch.compile``, custom ops included (they have fake kernels and
    autograd), with CUDA graphs on CUDA ("reduce-overhead"): a training step otherwise pays
    for every small op it launches (docs/design.md section 7). Shapes are static: histories are
    padded to ``max_len``, and the last, smaller batch of an epoch compiles once more. Inductor
    draws dropout masks with its own generator, so a compiled run is as random as an eager one
    but not the same draws (``torch._inductor.config.fallback_random`` makes them equal).
    """
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(model, mode=mode, dynamic=False)


def _epoch_seed(config: TrainConfig, epoch: int, stream: int) -> int:
    return (config.seed * 1_000_003 + epoch * 101 + stream) % 2**63


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    index: SequenceIndex,
    config: TrainConfig,
    epoch: int,
    group: ProcessGroup,
    progress: bool = False,
    step_callback: Callable[[torch.nn.Module], None] | None = None,
    deadline: float | None = None,
) -> tuple[float, int]:
    """One pass over this epoch's samples -> (mean loss over all processes, samples).

    With a ``deadline`` (a ``time.perf_counter()`` value) the pass stops after the first step
    that ends past it (rank 0 decides for every rank); the samples count then falls short of
    the epoch's.

    ``model`` may be DDP-wrapped. With several processes the epoch's sample order (the same on
    every rank) is padded to a multiple of the world size and dealt out round-robin, and each
    rank takes ceil(batch_size / world) samples per step, so every rank makes the same number of
    steps. Each rank draws its own dropout and negatives from (seed, epoch, rank).
    """
    rng = np.random.default_rng(_epoch_seed(config, epoch, 0))
    torch.manual_seed(_epoch_seed(config, epoch, 1 + 3 * group.rank))  # dropout
    negatives = torch.Generator().manual_seed(_epoch_seed(config, epoch, 2 + 3 * group.rank))
    users, cuts = index.train_samples(
        config.train_sampling, rng, config.max_len, config.window_step
    )
    if len(users) == 0:
        raise ValueError("no training samples: every user has fewer than 4 interactions")
    batch_size = config.batch_size
    if group.world > 1:
        dealt = np.arange(-(-len(users) // group.world) * group.world) % len(users)
        users, cuts = (
            users[dealt][group.rank :: group.world],
            cuts[dealt][group.rank :: group.world],
        )
        batch_size = -(-batch_size // group.world)
    model.train()
    num_items = getattr(model, "module", model).num_items
    # anchored at the first event, a streaming model gives every slot the same vector whatever
    # padding precedes it, so slots no history of the batch fills need no work (its compiled
    # step keeps max_len: a new length would compile again)
    trim_padding = config.streaming and not config.compile
    total, seen = 0.0, 0
    bar = tqdm(
        total=len(users), desc=f"epoch {epoch}", unit="seq", disable=not progress, leave=False
    )
    start = time.perf_counter()
    for first in range(0, len(users), batch_size):
        u, c = users[first : first + batch_size], cuts[first : first + batch_size]
        ids, times = index.histories(u, c, config.max_len)
        if config.train_sampling == "all-positions":
            targets = index.window_targets(u, c, config.max_len, config.window_step)
            if trim_padding:
                ids, times, targets = _without_shared_padding(ids, times, targets)
        ids_t = torch.from_numpy(ids).to(group.device)
        times_t = torch.from_numpy(times).to(group.device) if config.use_time else None
        if config.train_sampling == "all-positions":
            targets = torch.from_numpy(targets).to(group.device)
            loss = all_positions_loss(model, ids_t, targets, times_t)
        else:
            targets = torch.from_numpy(index.targets(u, c)).to(group.device)
            if config.loss == "full":
                loss = full_softmax_loss(model, ids_t, targets, times_t)
            else:
                target_times = None
                if config.leak_target_date:
                    target_times = torch.from_numpy(index.target_times(u, c)).to(group.device)
                loss = sampled_softmax_loss(
                    model,
                    ids_t,
                    targets,
                    times_t,
                    config.negatives,
                    num_items,
                    negatives,
                    target_timestamps=target_times,
                )
        if not torch.isfinite(loss):
            raise FloatingPointError(f"epoch {epoch}: loss became {loss.item()}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        if step_callback is not None:
            step_callback(getattr(model, "module", model))
        total += loss.item() * len(u)
        seen += len(u)
        bar.update(len(u))
        rate = seen * group.world / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{total / seen:.4f}", seq_per_s=f"{rate:.0f}")
        if deadline is not None and group.broadcast(time.perf_counter() >= deadline):
            break
    bar.close()
    return group.sum(total) / group.sum(seen), int(group.sum(seen))


def _without_shared_padding(
    ids: np.ndarray, times: np.ndarray | None, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Left-padded (B, L) batch arrays without the leading slots every row pads."""
    cut = ids.shape[1] - max(int((ids != 0).sum(1).max()), 1)
    return ids[:, cut:], None if times is None else times[:, cut:], targets[:, cut:]


def _payload(model, spec, config, data, epoch) -> dict:
    return {
        "model_spec": spec,
        "model": model.state_dict(),
        "config": config.to_dict(),
        "epoch": epoch,
        "item_ids": data.item_ids,
        "dataset": data.source,
    }


def _write_log(path: pathlib.Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buffer.getvalue().encode()))


class _TensorBoard:
    """TensorBoard scalars, the writer made at the first ``add`` (a run that fails before its
    first epoch leaves no ``tensorboard/`` folder)."""

    def __init__(self, out: pathlib.Path, echo: Callable[[str], None]) -> None:
        self.out, self.echo, self.writer, self.missing = out, echo, None, False

    def add(self, row: dict, epoch: int) -> None:
        if self.writer is None and not self.missing:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.echo("tensorboard is not installed: logging to log.csv only")
                self.missing = True
                return
            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(key, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _resolved(path: str | None) -> str | None:
    """A data path as an absolute one (so a run's checkpoints work from any folder)."""
    if path is None or path == "synthetic":
        return path
    return str(pathlib.Path(path).expanduser().resolve())


def _check_resumable(saved: dict, config: TrainConfig) -> None:
    """A setting the saved run lacks (added to ``TrainConfig`` since) had its default then."""
    now = config.to_dict()
    # newest_last: runs saved before it was a setting used the in-place layout
    saved = TrainConfig().to_dict() | {"newest_last": False} | upgrade_flags(saved)
    for key in ("data", "timestamps"):  # runs saved before paths were stored resolved
        saved[key] = _resolved(saved[key])
    changed = [k for k in now if k not in RESUMABLE_CHANGES and saved[k] != now[k]]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"cannot resume: the configuration differs from the saved run ({details})")


def train(
    config: TrainConfig,
    out_dir: str | pathlib.Path,
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    step_callback: Callable[[torch.nn.Module], None] | None = None,
) -> dict:
    """Train, keep ``best.pt``/``last.pt``/``log.csv`` in ``out_dir`` and write the test metrics of
    the best checkpoint under both protocols to ``metrics.json``. Returns a run summary.

    Under ``torchrun`` every process runs this; rank 0 alone writes files and prints.
    ``step_callback(model)`` runs after every optimizer step (tests check that replicas stay
    identical).
    """
    config.check()
    config.data, config.timestamps = _resolved(config.data), _resolved(config.timestamps)
    group = ProcessGroup.from_environment(config.device)
    folder = RunFolder(out_dir)
    failed = True
    try:
        # rank 0 locks; every rank learns the outcome, so none waits on a rank that stopped
        problem = None
        if group.is_main:
            try:
                folder.acquire()
            except RunFolderError as error:
                problem = (isinstance(error, RunFolderInUse), str(error))
        problem = group.broadcast(problem)
        if problem is not None:
            in_use, message = problem
            raise (RunFolderInUse if in_use else RunFolderError)(message)
        summary = _train(config, folder, resume, progress, echo, step_callback, group)
        failed = False
        return summary
    finally:
        folder.release(failed)
        group.close()


def _train(
    config: TrainConfig,
    folder: RunFolder,
    resume: bool,
    progress: bool,
    echo: Callable[[str], None],
    step_callback: Callable[[torch.nn.Module], None] | None,
    group: ProcessGroup,
) -> dict:
    say = echo if group.is_main else (lambda _message: None)
    out = folder.path
    last_path, best_path = out / "last.pt", out / "best.pt"
    if last_path.exists() and not resume:
        raise FileExistsError(f"{out} already holds a run: pass --resume or choose another --out")
    if resume and not last_path.exists():
        raise FileNotFoundError(f"cannot resume: {last_path} does not exist")
    saved = load_checkpoint(last_path, group.device) if resume else None
    if saved is not None:
        _check_resumable(saved["config"], config)
    data = load_training_data(config)
    index = SequenceIndex.from_dataset(data)
    negatives = None
    if "sampled" in config.protocols:
        try:
            negatives = sampled_negatives(data, seed=NEGATIVES_SEED)
        except ValueError as error:
            raise ValueError(
                f"{error}; the sampled protocol needs 99 negatives per user: "
                "train with --protocols full"
            ) from None
    torch.manual_seed(config.seed)
    spec = model_spec(config, data)
    model = build_model(spec).to(group.device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    state = {"epoch": 0, "best": -math.inf, "best_epoch": 0, "stale": 0, "log": [], "seconds": 0.0}
    if saved is not None:
        model.load_state_dict(saved["model"])
        try:
            optimizer.load_state_dict(saved["optimizer"])
        except ValueError:  # a parameter layout of another convrec version (e.g. per level)
            raise CheckpointError(
                f"cannot resume {last_path}: its optimizer state has another parameter layout "
                "than this convrec builds; evaluate or serve it, or train a new run"
            ) from None
        state = saved["state"]
        say(f"resuming {out} after epoch {state['epoch']}")
    trained = model
    if group.world > 1:
        ids = [group.device.index] if group.device.type == "cuda" else None
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if config.compile:
        trained = compile_for_training(trained, group.device)
    params = sum(p.numel() for p in model.parameters())
    say(
        f"{config.model} on {data.name}: {data.num_users} users, {data.num_items} items, "
        f"{params:,} parameters" + (f", {group.world} processes" if group.world > 1 else "")
    )
    evaluate_args = dict(
        max_len=config.max_len,
        batch_size=config.eval_batch_size,
        device=group.device,
        index=index,
        negatives=negatives,
    )
    writer = _TensorBoard(out, say) if group.is_main else None
    stopped_by = "epochs"
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        if state["stale"] >= config.patience:
            stopped_by = "patience"
            break
        if config.time_budget is not None and state["seconds"] >= config.time_budget:
            stopped_by = "time_budget"
            break
        start = time.perf_counter()
        deadline = None
        if config.time_budget is not None:
            deadline = start + config.time_budget - state["seconds"]
        loss, samples = train_one_epoch(
            trained,
            optimizer,
            index,
            config,
            epoch,
            group,
            progress and group.is_main,
            step_callback,
            deadline,
        )
        seconds = group.broadcast(time.perf_counter() - start)
        valid = evaluate(model, data, "valid", config.protocols, **evaluate_args)
        state["wall_seconds"] = state.get("wall_seconds", 0.0) + time.perf_counter() - start
        state["seconds"] += seconds
        out_of_time = deadline is not None and start + seconds >= deadline
        if out_of_time:  # stopped mid-epoch (or just at its end): this epoch is the last
            state["seconds"] = max(state["seconds"], config.time_budget)
        row = {
            "epoch": epoch,
            "train_loss": loss,
            "epoch_seconds": seconds,
            "samples_per_second": samples / seconds,
        }
        row |= {f"valid/{k}": v for k, v in valid.items()}
        state["log"].append(row)
        improved = valid[config.select] > state["best"]
        if improved:
            state.update(best=valid[config.select], best_epoch=epoch, stale=0)
        else:
            state["stale"] += 1
        state["epoch"] = epoch
        if group.is_main:
            folder.wrote = True
            if improved:
                save_checkpoint(best_path, _payload(model, spec, config, data, epoch))
            last = _payload(model, spec, config, data, epoch)
            save_checkpoint(last_path, last | {"optimizer": optimizer.state_dict(), "state": state})
            save_json(out / "config.json", config.to_dict())
            _write_log(out / "log.csv", state["log"])
            writer.add(row, epoch)
        group.barrier()
        say(
            f"epoch {epoch}: loss {loss:.4f}, {seconds:.1f} s ({samples / seconds:.0f} seq/s), "
            f"valid {config.select} {valid[config.select]:.4f}" + (" *" if improved else "")
        )
        if out_of_time:
            stopped_by = "time_budget"
            if epoch < config.epochs:
                say(f"time budget of {config.time_budget:g} s spent during epoch {epoch}")
            break
    if writer is not None:
        writer.close()
    best = load_checkpoint(best_path, group.device)
    if best["epoch"] != state["best_epoch"]:
        raise RuntimeError(
            f"{best_path} holds epoch {best['epoch']} but the run's best is epoch "
            f"{state['best_epoch']}: another process wrote to {out}; train this run again"
        )
    model.load_state_dict(best["model"])
    start = time.perf_counter()
    test = evaluate(model, data, "test", config.protocols, **evaluate_args)
    test_seconds = time.perf_counter() - start
    summary = {
        "model": config.model,
        "data": data.name,
        "parameters": params,
        "processes": group.world,
        "epochs_trained": state["epoch"],
        "best_epoch": state["best_epoch"],
        "stopped_by": stopped_by,
        f"best_valid/{config.select}": state["best"],
        "train_seconds": state["seconds"],
        "seconds_per_epoch": state["seconds"] / max(len(state["log"]), 1),
        # training, validation every epoch and the final test evaluation
        "wall_seconds": state.get("wall_seconds", 0.0) + test_seconds,
        "test": test,
    }
    if group.is_main:
        save_json(out / "metrics.json", test)
        save_json(out / "summary.json", summary)
    group.barrier()
    return summary
