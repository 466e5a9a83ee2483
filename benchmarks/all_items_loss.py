"""The full-softmax loss of a training step, forward + backward, side by side: the reference
(``F.cross_entropy`` of the (P, N + 1) score matrix, what training ran before) and the chunked
``all_items_cross_entropy`` (convrec/ops/all_items.py).

    OMP_NUM_THREADS=1 python -m benchmarks.all_items_loss --out benchmarks/results/loss_cpu

P targets (user vectors) against N items, D = 64, float32 (``--device cuda``: the same on a
GPU). Times are medians of ``--repeats`` steps after two warm-ups, with freed blocks kept in the
process as ``convrec train`` keeps them (``convrec.training.allocator``), so neither side pays
page faults; peak memory is what one step adds (``benchmarks.peak_memory``). Writes
``all_items_loss.csv``, ``all_items_loss.md`` and ``all_items_loss.png``.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import statistics
import sys
from collections.abc import Callable

import torch

from benchmarks.machine import machine_info
from benchmarks.peak_memory import cpu_peak_problem, peak_bytes
from benchmarks.timing import time_ms
from convrec.ops.all_items import all_items_cross_entropy, all_items_cross_entropy_reference
from convrec.training.allocator import keep_freed_memory

SERIES = {"reference": all_items_cross_entropy_reference, "chunked": all_items_cross_entropy}
COLUMNS = ("series", "targets", "items", "D", "ms", "low_ms", "high_ms", "peak_mib")


def make_step(series: str, targets: int, items: int, args: argparse.Namespace) -> Callable:
    """One forward + backward of ``series`` on fixed random inputs."""
    device = torch.device(args.device)
    g = torch.Generator(device="cpu").manual_seed(0)
    users = torch.randn(targets, args.d_model, generator=g).to(device).requires_grad_()
    vectors = (0.1 * torch.randn(items + 1, args.d_model, generator=g)).to(device)
    vectors.requires_grad_()
    ids = torch.randint(1, items + 1, (targets,), generator=g).to(device)
    loss = SERIES[series]

    def step() -> None:
        users.grad = vectors.grad = None
        loss(users, vectors, ids).backward()

    return step


def measure(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    memory = device.type == "cuda" or cpu_peak_problem() is None
    rows = []
    for items in args.items:
        for targets in args.targets:
            for series in SERIES:
                step = make_step(series, targets, items, args)
                peak = peak_bytes(step, device) / 2**20 if memory else float("nan")
                times = time_ms(step, args.repeats, device)
                rows.append(
                    dict(
                        series=series,
                        targets=targets,
                        items=items,
                        D=args.d_model,
                        ms=round(statistics.median(times), 2),
                        low_ms=round(min(times), 2),
                        high_ms=round(max(times), 2),
                        peak_mib=round(peak, 1),
                    )
                )
                print(f"{series:>9} P={targets} N={items}: {rows[-1]['ms']} ms", flush=True)
    return rows


def write(rows: list[dict], args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "all_items_loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    info = machine_info(args.device)
    pairs = {(r["targets"], r["items"], r["series"]): r for r in rows}
    lines = [
        "# Full-softmax loss, forward + backward: score matrix vs chunked",
        "",
        f"torch {info['torch']}, {info['cpu'] or info['gpu']}, threads {info['threads']}; "
        f"D = {args.d_model}, float32, median of {args.repeats} steps; peak = memory one step "
        "adds. *reference*: `F.cross_entropy(score_all_items(users, items), targets)`; "
        "*chunked*: `all_items_cross_entropy` (convrec/ops/all_items.py).",
        "",
        "| targets | items | reference ms | chunked ms | speed-up | reference peak MiB | "
        "chunked peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for items in args.items:
        for targets in args.targets:
            ref, ours = pairs[targets, items, "reference"], pairs[targets, items, "chunked"]
            lines.append(
                f"| {targets:,} | {items:,} | {ref['ms']} | {ours['ms']} | "
                f"{ref['ms'] / ours['ms']:.2f}x | {ref['peak_mib']} | {ours['peak_mib']} |"
            )
    lines += ["", "Command:", "", f"    {args.command}", ""]
    (args.out / "all_items_loss.md").write_text("\n".join(lines))
    plot(rows, args)


def plot(rows: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.items), figsize=(5 * len(args.items), 4), squeeze=False)
    for ax, items in zip(axes[0], args.items, strict=True):
        for series in SERIES:
            points = [r for r in rows if r["items"] == items and r["series"] == series]
            ax.plot([r["targets"] for r in points], [r["ms"] for r in points], "o-", label=series)
        ax.set(xscale="log", yscale="log", xlabel="targets per step", ylabel="ms (fwd + bwd)")
        ax.set_title(f"{items:,} items, D = {args.d_model}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "all_items_loss.png", dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--targets", type=int, nargs="+", default=[256, 1500, 6000])
    parser.add_argument("--items", type=int, nargs="+", default=[12_102, 50_000])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.command = "OMP_NUM_THREADS=1 python -m benchmarks.all_items_loss " + " ".join(argv)
    keep_freed_memory()
    write(measure(args), args)


if __name__ == "__main__":
    main()
