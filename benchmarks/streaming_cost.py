"""What one new event costs a recommender that already served the user's history, side by side:

- streaming ConvRec: ``ConvRecEncoder(streaming=True, newest_last=False).push`` (the in-place
  layout) on the user's state, eager and under ``torch.compile`` (how a server would run it:
  the eager push is a few dozen small ops per level, so its time is mostly per-op overhead);
  "newest-last push" the compiled push with ``newest_last=True``, the streaming default (the
  state also keeps each open window's terms by shift);
- full ConvRec recompute: ``ConvRecEncoder.forward`` over the whole history again (windows
  anchored at the newest item shift with every event, so nothing can be reused);
- SASRec with a KV cache: the new position's query, key and value in each of 2 blocks, its
  attention over the cached keys and values, the feed-forward block.

    python -m benchmarks.streaming_cost --out benchmarks/results/streaming_cpu
    python -m benchmarks.streaming_cost --device cuda --out DIR      # in benchmarks/gpu_check.sh

For each history length L (levels from ``schedule_for_length(L)``, D = 64, a batch of B users
updated together, eval mode, no autograd) it reports the median milliseconds per batch update
and the state each user keeps between events: the streaming state (``StreamState``), the
history's item ids for a recompute, the cached keys and values for SASRec (bytes at
``--state-dtype``). The push does the same work at every history length (only ``events``
decides which sums move), so its state is timed with ``events`` set to L rather than built
event by event. Writes ``streaming_cost.csv``, ``streaming_cost.md`` and ``streaming_cost.png``.
"""

from __future__ import annotations

import argparse
import csv
import math
import pathlib
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.machine import machine_info
from benchmarks.timing import time_ms
from convrec import ConvRecEncoder
from convrec.baselines.sasrec import TransformerEncoder
from convrec.schedule import schedule_for_length

LENGTHS = (50, 500, 5_000, 10_000, 100_000)
SERIES = ("streaming push", "compiled push", "newest-last push", "full recompute")
SERIES += ("SASRec KV cache",)
COLUMNS = ("series", "L", "B", "D", "levels", "ms", "low_ms", "high_ms", "state_bytes")


def streaming_push(
    length: int, args: argparse.Namespace, compiled: bool = False, newest_last: bool = False
) -> tuple[Callable[[], object], int]:
    levels = schedule_for_length(length, 8)
    encoder = ConvRecEncoder(
        args.d_model, levels, dropout=0.0, streaming=True, newest_last=newest_last
    ).eval()
    state = encoder.initial_state(args.batch, torch.zeros(1))
    state = state._replace(events=torch.full((args.batch,), length))
    x = torch.randn(args.batch, args.d_model)
    per_user = (
        sum(
            t[0].numel() * args.state_bytes
            for part in state[1:]
            for t in (part if isinstance(part, list) else [part])
        )
        + 8
    )  # the event count
    push = torch.compile(encoder.push, dynamic=False) if compiled else encoder.push
    return (lambda: push(state, x)), per_user


def full_recompute(length: int, args: argparse.Namespace) -> tuple[Callable[[], object], int]:
    encoder = ConvRecEncoder.for_length(length, args.d_model, dropout=0.0).eval()
    x = torch.randn(args.batch, length, args.d_model)
    return (lambda: encoder(x)), 8 * length  # the history's item ids


def sasrec_kv_cache(length: int, args: argparse.Namespace) -> tuple[Callable[[], object], int]:
    """One decode step of the 2-block encoder against caches of ``length`` keys and values."""
    model = TransformerEncoder(args.d_model, max_len=2, num_blocks=2, heads=2, dropout=0.0).eval()
    heads, head_dim = 2, args.d_model // 2
    caches = [
        torch.randn(2, args.batch, heads, length + 1, head_dim) for _ in range(len(model.blocks))
    ]
    x = torch.randn(args.batch, 1, args.d_model)

    def step() -> torch.Tensor:
        h = x
        for block, cache in zip(model.blocks, caches, strict=True):
            q, k, v = block.attn.qkv(block.attn_norm(h)).view(args.batch, 1, 3, heads, -1).unbind(2)
            cache[0, :, :, length], cache[1, :, :, length] = k[:, 0], v[:, 0]
            y = F.scaled_dot_product_attention(q.transpose(1, 2), cache[0], cache[1])
            h = h + block.attn.out(y.transpose(1, 2).reshape(args.batch, 1, args.d_model))
            h = h + block.ffn(block.ffn_norm(h))
        return model.final_norm(h)

    per_user = 2 * len(model.blocks) * length * args.d_model * args.state_bytes
    return step, per_user


MAKERS = {
    "streaming push": streaming_push,
    "compiled push": lambda length, args: streaming_push(length, args, compiled=True),
    "newest-last push": lambda length, args: streaming_push(
        length, args, compiled=True, newest_last=True
    ),
    "full recompute": full_recompute,
    "SASRec KV cache": sasrec_kv_cache,
}


def sweep(args: argparse.Namespace) -> list[dict]:
    rows = []
    for length in args.lengths:
        for series in args.series:
            run, state_bytes = MAKERS[series](length, args)
            with torch.no_grad():
                times = time_ms(run, args.repeats, torch.device(args.device))
            levels = len(schedule_for_length(length, 8))
            rows.append(
                dict(series=series, L=length, B=args.batch, D=args.d_model, levels=levels,
                     ms=statistics.median(times), low_ms=min(times), high_ms=max(times),
                     state_bytes=state_bytes)
            )  # fmt: skip
            print(f"{series:>16} L={length:>7,}: {rows[-1]['ms']:.3f} ms", flush=True)
    return rows


def write(rows: list[dict], out: pathlib.Path, command: str, device: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "streaming_cost.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    info = ", ".join(f"{k} {v}" for k, v in machine_info(device).items() if v)
    lines = [
        "# Cost of one new event per user",
        "",
        f"Command: `{command}`. Machine: {info}. B = {rows[0]['B']}, D = {rows[0]['D']}.",
        "",
        "Median ms per batch update (state per user). Recompute / push = how many times the",
        "streaming update (eager, compiled, compiled newest-last: those measured) is cheaper",
        "than recomputing the history.",
        "",
        "| L | " + " | ".join(SERIES) + " | recompute / push |",
        "|---|" + "---|" * (len(SERIES) + 1),
    ]
    for length in dict.fromkeys(r["L"] for r in rows):
        cells = {r["series"]: r for r in rows if r["L"] == length}
        text = [
            f"{cells[s]['ms']:.3g} ms ({_size(cells[s]['state_bytes'])})" if s in cells else "-"
            for s in SERIES
        ]
        recompute = cells["full recompute"]["ms"] if "full recompute" in cells else math.nan
        pushes = [s for s in ("streaming push", "compiled push", "newest-last push") if s in cells]
        ratio = " / ".join(f"{recompute / cells[s]['ms']:,.0f}x" for s in pushes)
        lines.append(f"| {length:,} | " + " | ".join(text) + f" | {ratio} |")
    (out / "streaming_cost.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "streaming_cost.png")


def _size(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 2**20 else f"{n / 2**20:,.1f} MiB"


def _plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_axis, state_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for series in dict.fromkeys(r["series"] for r in rows):
        mine = [r for r in rows if r["series"] == series]
        lengths = [r["L"] for r in mine]
        time_axis.plot(lengths, [r["ms"] for r in mine], marker="o", label=series)
        state_axis.plot(lengths, [r["state_bytes"] for r in mine], marker="o", label=series)
    for axis, label in ((time_axis, "ms per batch update"), (state_axis, "state bytes per user")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("history length L")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    time_axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.streaming_cost", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--state-dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--series", nargs="+", default=list(SERIES), choices=list(SERIES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    args.state_bytes = 2 if args.state_dtype == "bf16" else 4
    torch.manual_seed(0)
    with torch.device(args.device):  # every model and tensor the series build
        rows = sweep(args)
    command = "python -m benchmarks.streaming_cost " + " ".join(argv or sys.argv[1:])
    write(rows, pathlib.Path(args.out), command, args.device)


if __name__ == "__main__":
    main()
