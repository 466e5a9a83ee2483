"""The ``downscale`` op side by side: extension vs reference eager vs reference torch.compile.

The op, its inputs and the providers come from ``benchmarks.registry`` (``ops/downscale.py``):
one training step of the op alone (forward, then the gradients of x and every level parameter),
at B = 64, D = 64 and L = 50, 512, 4096 by default, as ``ConvRecEncoder`` runs it. The
providers take turns within each repeat, so a noisy shared machine slows them alike; the table
reports medians and the ratios. Saved-for-backward bytes come from ``saved_tensors_hooks``
(parameters excluded).

Reproduce the committed CPU table (writes ``benchmarks/results/downscale_cpu.{csv,md}``) from the
repository root::

    python -m benchmarks.downscale_table

On a GPU machine: ``--device cuda --dtype bf16 --out benchmarks/results/downscale_cuda``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.machine import cpu_model
from benchmarks.ops.downscale import Shape
from benchmarks.ops.spec import DTYPES, forward, make_step, provider_problem
from benchmarks.registry import get
from convrec.bench.measure import saved_tensor_bytes

BENCH = get("downscale")
DEFAULT = next(iter(BENCH.shapes.values()))  # B and D of the registry's shapes


def providers(device: torch.device) -> list[str]:
    """The registry's providers that can run here (the extension only when built)."""
    return [p for p in BENCH.providers if provider_problem(BENCH, p, device) is None]


def measure(
    length: int,
    batch: int,
    d_model: int,
    device: str,
    dtype: torch.dtype,
    repeats: int,
    warmup: int,
) -> list[dict]:
    """Rows (one per provider) for one length; providers interleaved within each repeat."""
    where = torch.device(device)
    inputs = BENCH.make_inputs(Shape(batch, length, d_model), where, dtype)
    names = providers(where)
    steps = {name: make_step(BENCH, name, inputs, "fwd+bwd") for name in names}
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():  # each step synchronises the device itself
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    rows = []
    for name in names:
        saved = saved_tensor_bytes(forward(BENCH, name, inputs), inputs.parameters)
        rows.append(
            {
                "L": length,
                "B": batch,
                "D": d_model,
                "levels": inputs.info["levels"],
                "provider": name,
                "median_ms": statistics.median(times[name]) * 1e3,
                "min_ms": min(times[name]) * 1e3,
                "max_ms": max(times[name]) * 1e3,
                "saved_MiB": saved / 2**20,
            }
        )
    return rows


def markdown(rows: list[dict], command: str, device: str, dtype: str, repeats: int) -> str:
    """The side-by-side table: times, ratios against the extension, saved bytes."""
    native = "cuda" if device == "cuda" else "cpp"
    threads = torch.get_num_threads()
    lines = [
        f"`downscale` forward+backward, {device} {dtype}, torch {torch.__version__}, "
        f"{threads} threads, {cpu_model()}; median of "
        f"{repeats} interleaved repeats (min..max). Training mode, dropout 0.1, all-real mask; "
        "gradients of x and all level parameters.",
        "",
        f"Command: `{command}`",
        "",
        "| L | levels | provider | fwd+bwd ms | vs ext | saved for backward |",
        "|---|---|---|---|---|---|",
    ]
    by_length: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_length.setdefault(r["L"], {})[r["provider"]] = r
    for length, group in by_length.items():
        ext = group.get(native)
        for name, r in group.items():
            ratio = f"{r['median_ms'] / ext['median_ms']:.2f}x" if ext else "-"
            lines.append(
                f"| {length} | {r['levels']} | {name} | {r['median_ms']:.1f} "
                f"({r['min_ms']:.1f}..{r['max_ms']:.1f}) | {ratio} | {r['saved_MiB']:.1f} MiB |"
            )
    lines += ["", "`vs ext`: provider time / extension time (above 1 = the extension is faster)."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.downscale_table [flags]``: measure, print and write the table."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.downscale_table", description=__doc__.split("\n")[0]
    )
    lengths = [shape.length for shape in BENCH.shapes.values()]
    parser.add_argument("--lengths", type=int, nargs="+", default=lengths)
    parser.add_argument("--batch", type=int, default=DEFAULT.batch)
    parser.add_argument("--d-model", type=int, default=DEFAULT.d_model)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/downscale_cpu")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    rows = []
    for length in args.lengths:
        rows += measure(
            length,
            args.batch,
            args.d_model,
            args.device,
            DTYPES[args.dtype],
            args.repeats,
            args.warmup,
        )
        print(f"L={length} done", file=sys.stderr, flush=True)
    command = " ".join(["python -m benchmarks.downscale_table", *argv])
    table = markdown(rows, command, args.device, args.dtype, args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
