"""Time and memory of ConvRec against attention as the history grows.

Run from the repository root: ``python -m benchmarks.scaling --device cpu`` (``--help``).

For each history length L, side by side in one run: ConvRec with each backend of the device and
the SASRec baseline with SDPA and with materialised attention scores; as full recommenders
(same item encoder, full-softmax loss) and, with ``--scopes encoder``, as bare encoders. Each
(scope, model, backend, L) runs in a fresh worker process (``scaling_worker``). A series stops
at the first L where it ran out of memory or time, and a configuration is skipped when its
predicted attention scores exceed the memory cap or its predicted time the budget, so a sweep
ends in bounded time. Writes ``scaling.csv``, log-log plots and ``scaling.md`` (see
``scaling_report``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from benchmarks.machine import available_ram_bytes, device_memory_bytes, machine_info
from benchmarks.peak_memory import cpu_peak_problem
from benchmarks.scaling_report import check_plotting, write_report
from benchmarks.scaling_settings import GIB, Series, Settings
from benchmarks.scaling_worker import ATTENTION_HEADS, ATTENTIONS, SCOPES, Config, metrics
from benchmarks.scaling_worker import run as worker_run
from convrec.ops.dispatch import extension_status, triton_status

DEFAULT_LENGTHS = (50, 128, 512, 1024, 2048, 4096, 8192, 16384)
GPU_EXTRA_LENGTHS = (32768, 65536, 131072, 262144)  # a GPU fits more; OOM ends each series
CONVREC_BACKENDS = {"cpu": ("reference", "cpp", "triton"), "cuda": ("reference", "triton", "cuda")}
STATUSES = ("ok", "oom", "timeout", "skipped", "unavailable", "error")
COLUMNS = (
    "scope", "model", "backend", "device", "L", "B", "D", "items", "metric", "unit", "value",
    "low", "high", "repeats", "status", "detail", "torch", "triton", "cpu", "threads", "gpu",
)  # fmt: skip
WORKER_GRACE_S = 60.0  # process start and one overrunning call, before a worker is killed
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]  # workers import ``benchmarks`` from it


def all_series(scopes: tuple[str, ...], device: str) -> list[Series]:
    """ConvRec with each backend of the device, then SASRec with each attention, per scope."""
    return [
        Series(scope, model, backend)
        for scope in scopes
        for model, backends in (("ConvRec", CONVREC_BACKENDS[device]), ("SASRec", ATTENTIONS))
        for backend in backends
    ]


def not_runnable(series: Series, device: str) -> tuple[str, str] | None:
    """("unavailable" | "skipped", why) for a backend that cannot give a meaningful time here."""
    if series.model != "ConvRec" or series.backend == "reference":
        return None
    if series.backend == "triton":
        reason = triton_status(device)
        if reason is not None:
            return "unavailable", reason
        if device == "cpu":
            return "skipped", "Triton on CPU runs in its interpreter: for tests, not for speed"
        return None
    reason = extension_status()
    if reason is not None:
        return "unavailable", reason
    key = "CUDA" if series.backend == "cuda" else "CPU"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("convrec::downscale", key):
        return "unavailable", f"convrec._C was built without a {key} kernel for downscale"
    return None


def naive_score_bytes(batch_size: int, length: int) -> int:
    """Bytes of one block's materialised (B, heads, L, L) float32 attention scores."""
    return batch_size * ATTENTION_HEADS * length * length * 4


def predicted_seconds(history: list[tuple[int, float]], length: int) -> float | None:
    """Least time a configuration at ``length`` takes, from the same series at smaller L.

    One call per phase (the least a worker needs when calls are long), extrapolated from the
    last per-call cost with the series' last local log-log slope clamped to [1, 2] (2 when only
    one point is known), so neither a floor-dominated start nor noise under-predicts attention.
    """
    if not history:
        return None
    last_length, last_cost = history[-1]
    slope = 2.0
    if len(history) > 1:
        prev_length, prev_cost = history[-2]
        if prev_cost > 0 and last_cost > 0:
            local = math.log(last_cost / prev_cost) / math.log(last_length / prev_length)
            slope = min(2.0, max(1.0, local))
    return last_cost * (length / last_length) ** slope


def _read_results(path: pathlib.Path) -> tuple[dict[str, dict], float | None]:
    """Metric -> record, and the per-call cost, from a worker's JSON-lines file."""
    records: dict[str, dict] = {}
    cost = None
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "cost_s" in record:
                cost = record["cost_s"]
            elif "metric" in record:
                metric = record.pop("metric")
                records[metric] = record | {"status": "ok"}
            else:
                for metric in record["failed"]:
                    records[metric] = {"status": record["status"], "detail": record["detail"]}
    return records, cost


def _run_worker(config: Config, path: pathlib.Path) -> tuple[str, str] | None:
    """Measure ``config`` in a fresh process into ``path``; (status, why) when it failed."""
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.scaling_worker",
                json.dumps(dataclasses.asdict(config)),
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=config.budget_s + WORKER_GRACE_S,
            cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired:
        return "timeout", f"worker killed after {config.budget_s + WORKER_GRACE_S:g} s"
    if done.returncode == -signal.SIGKILL:
        return "oom", "worker killed by SIGKILL (the kernel's OOM killer?)"
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return "error", f"worker exit {done.returncode}: {tail[:300]}"
    return None


def run_config(config: Config, in_process: bool = False) -> tuple[dict[str, dict], float | None]:
    """Measure one configuration; every metric of its scope gets a record, whatever happened.

    ``in_process`` skips the worker process (quick checks and tests): no kill on overrun, no
    memory limit, errors propagate, and peak memory is rough (allocator state carries over).
    """
    with tempfile.TemporaryDirectory(prefix="convrec-scaling-") as folder:
        path = pathlib.Path(folder) / "results.jsonl"
        failure = None
        if in_process:
            with open(path, "w") as out:
                worker_run(config, out)
        else:
            failure = _run_worker(config, path)
        records, cost = _read_results(path)
    status, detail = failure or ("error", "the worker wrote no result for this metric")
    for metric in metrics(config.scope):
        records.setdefault(metric, {"status": status, "detail": detail})
    return records, cost


def _rows(
    series: Series, settings: Settings, length: int, records: dict, machine: dict
) -> list[dict]:
    rows = []
    for metric in metrics(series.scope):
        record = records[metric]
        rows.append(
            dataclasses.asdict(series)
            | {
                "device": settings.device,
                "L": length,
                "B": settings.batch_size,
                "D": settings.d_model,
                "items": settings.num_items,
                "metric": metric,
                "unit": "s" if metric.endswith("_s") else "bytes",
                "value": record.get("value"),
                "low": record.get("low", record.get("value")),
                "high": record.get("high", record.get("value")),
                "repeats": record.get("repeats", 1 if record["status"] == "ok" else None),
                "status": record["status"],
                "detail": record.get("detail", ""),
            }
            | machine
        )
    return rows


def _planned_skip(
    series: Series, settings: Settings, length: int, stopped: str | None, history: list
) -> tuple[str, str] | None:
    """Why a configuration is not run: its series stopped, or a predicted cost too high."""
    if stopped is not None:
        return "skipped", stopped
    if series.model == "SASRec" and series.backend == "naive":
        scores = naive_score_bytes(settings.batch_size, length)
        if scores > settings.memory_cap_bytes:
            return "skipped", (
                f"predicted score tensor {scores / GIB:.1f} GiB > cap "
                f"{settings.memory_cap_bytes / GIB:.1f} GiB"
            )
    predicted = predicted_seconds(history, length)
    if predicted is not None and predicted > settings.budget_s:
        return "skipped", f"predicted >= {predicted:.0f} s > budget {settings.budget_s:g} s"
    return None


def _config(series: Series, settings: Settings, length: int) -> Config:
    return Config(
        scope=series.scope,
        model=series.model,
        backend=series.backend,
        device=settings.device,
        length=length,
        batch_size=settings.batch_size,
        d_model=settings.d_model,
        num_items=settings.num_items,
        top_k=settings.top_k,
        repeats=settings.repeats,
        budget_s=settings.budget_s,
        seed=settings.seed,
        memory_limit_bytes=settings.memory_limit_bytes,
        threads=settings.threads,
    )


def sweep(settings: Settings, csv_path: pathlib.Path, progress: bool = True) -> list[dict]:
    """Run every (series, L), L ascending, appending rows to ``csv_path`` as they come."""
    machine = machine_info(settings.device)
    series_list = all_series(settings.scopes, settings.device)
    runnable = {s: not_runnable(s, settings.device) for s in series_list}
    stopped: dict[Series, str | None] = dict.fromkeys(series_list)  # why no larger L runs
    history: dict[Series, list[tuple[int, float]]] = {s: [] for s in series_list}
    rows: list[dict] = []
    bar = tqdm(total=len(series_list) * len(settings.lengths), disable=not progress, unit="cfg")
    with open(csv_path, "w", newline="") as handle, bar:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        for length in settings.lengths:
            for s in series_list:
                bar.set_description(f"{s.label} L={length}")
                skip = runnable[s] or _planned_skip(s, settings, length, stopped[s], history[s])
                if skip is not None:
                    records = {m: {"status": skip[0], "detail": skip[1]} for m in metrics(s.scope)}
                else:
                    records, cost = run_config(_config(s, settings, length), settings.in_process)
                    failed = {r["status"] for r in records.values()} & {"oom", "timeout"}
                    if failed:
                        stopped[s] = f"{'/'.join(sorted(failed))} at L={length}"
                    elif cost is not None:
                        history[s].append((length, cost))
                new = _rows(s, settings, length, records, machine)
                writer.writerows(new)
                handle.flush()
                rows += new
                bar.update()
    return rows


def _settings(args: argparse.Namespace) -> Settings:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch")
    lengths = args.lengths or DEFAULT_LENGTHS + (GPU_EXTRA_LENGTHS if device == "cuda" else ())
    if min(lengths) < 1 or min(args.batch_size, args.d_model, args.items, args.repeats) < 1:
        raise SystemExit("lengths, --batch-size, --d-model, --items and --repeats must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    if not 1 <= args.top_k <= args.items:
        raise SystemExit(f"--top-k must be in [1, --items={args.items}], got {args.top_k}")
    cap = args.memory_cap_gib
    limit = args.memory_limit_gib
    if device == "cpu" and limit is None:
        limit = 0.75 * available_ram_bytes() / GIB
    return Settings(
        device=device,
        lengths=tuple(sorted(set(lengths))),
        batch_size=args.batch_size,
        d_model=args.d_model,
        num_items=args.items,
        top_k=args.top_k,
        repeats=args.repeats,
        budget_s=args.budget,
        memory_cap_bytes=int((device_memory_bytes(device) / 8) if cap is None else cap * GIB),
        memory_limit_bytes=None if device == "cuda" else int(limit * GIB),
        scopes=tuple(dict.fromkeys(args.scopes)),
        seed=args.seed,
        threads=args.threads,
        in_process=args.in_process,
    )


def run(args: argparse.Namespace) -> None:
    """Sweep, then write the CSV, the plots and the report into ``--out``."""
    check_plotting()  # before the sweep, not after it
    settings = _settings(args)
    if settings.threads is not None:  # here too: the rows record this process's thread count
        torch.set_num_threads(settings.threads)
    if settings.device == "cpu" and (problem := cpu_peak_problem()) is not None:
        raise SystemExit(f"peak memory cannot be measured here: {problem}")
    out = pathlib.Path(args.out or f"benchmarks/results/scaling_{settings.device}")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = sweep(settings, out / "scaling.csv", progress=not args.no_progress)
    report = write_report(rows, settings, out, wall_s=time.perf_counter() - start)
    print(f"wrote {out / 'scaling.csv'}, the plots and {report}")


DESCRIPTION = (
    "Sweeps the history length L and measures, for ConvRec with each backend and SASRec with "
    "SDPA and with materialised attention: forward, training-step and top-k time, bytes saved "
    "for backward and peak memory. Writes a CSV, log-log plots with fitted slopes and a "
    "Markdown report."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's flags."""
    p.add_argument(
        "--device", choices=["cpu", "cuda"], help="where to run (default: cuda when present)"
    )
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        help=f"history lengths L (default {' '.join(map(str, DEFAULT_LENGTHS))}, on a GPU also "
        f"{' '.join(map(str, GPU_EXTRA_LENGTHS))})",
    )
    p.add_argument("--batch-size", type=int, default=32, help="histories per batch B (32)")
    p.add_argument("--d-model", type=int, default=64, help="width D of every model (64)")
    p.add_argument("--items", type=int, default=10_000, help="synthetic catalogue size (10000)")
    p.add_argument("--top-k", type=int, default=10, help="k of the top-k inference (10)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per phase, at most (5)")
    p.add_argument(
        "--budget",
        type=float,
        default=300.0,
        help="seconds one configuration may take: repeats are planned to fill half of it, a "
        "phase that cannot be timed within it is a timeout, and a series whose next L is "
        "predicted to exceed it is skipped from there on (300)",
    )
    p.add_argument(
        "--memory-cap-gib",
        type=float,
        help="skip materialised attention once one block's predicted score tensor exceeds this "
        "(default: 1/8 of the device's memory)",
    )
    p.add_argument(
        "--memory-limit-gib",
        type=float,
        help="CPU: address-space limit of each worker, so an allocation past it is recorded as "
        "oom instead of waking the kernel's OOM killer (default: 3/4 of the available RAM)",
    )
    p.add_argument(
        "--scopes",
        nargs="+",
        choices=SCOPES,
        default=list(SCOPES),
        help="'model': full recommenders with loss and top-k; 'encoder': encoders alone (both)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the inputs (0)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads per configuration (default: torch's, one per core); 1 steadies "
        "timings on a machine others are using",
    )
    p.add_argument("--out", help="output folder (default benchmarks/results/scaling_<device>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="quick check: run every configuration in this process (starts faster, but no kill "
        "on overrun, no memory limit, and rough peak memory: allocator state carries over)",
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.scaling [flags]``: parse the flags and run the sweep."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=DESCRIPTION)
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
