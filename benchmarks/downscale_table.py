"""The ``downscale`` op side by side: extension vs reference eager vs reference torch.compile.

One training step of the op alone (forward, then the gradients of x and every level parameter),
at B = 64, D = 64 and L = 50, 512, 4096 by default, levels from ``schedule_for_length(L)``,
dropout 0.1 in training mode and an all-real padding mask, as ``ConvRecEncoder`` runs it. The
providers take turns within each repeat, so a noisy shared machine slows them alike; the table
reports medians and the ratios. Saved-for-backward bytes come from ``saved_tensors_hooks``
(parameters excluded).

Reproduce the committed CPU table (writes ``benchmarks/results/downscale_cpu.{csv,md}``)::

    .venv/bin/python benchmarks/downscale_table.py

On a GPU machine: ``--device cuda --dtype bf16 --out benchmarks/results/downscale_cuda``.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from convrec import ConvRecEncoder
from convrec.bench.measure import saved_tensor_bytes
from convrec.ops import LevelParams, downscale
from convrec.ops.dispatch import extension_status

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}


class Case:
    """Inputs and level parameters of one benchmark shape (fixed seed)."""

    def __init__(self, batch: int, length: int, d_model: int, device: str, dtype: torch.dtype):
        torch.manual_seed(0)
        encoder = ConvRecEncoder.for_length(length, d_model, dropout=0.1)
        encoder = encoder.to(device=device, dtype=dtype)
        self.levels = encoder.levels
        self.heads = encoder.heads
        self.strides = [s for _, s in encoder.levels]
        self.params = [level.params() for level in encoder.stack]
        self.leaves = [p for level in encoder.stack for p in level.parameters()]
        self.x = torch.randn(batch, length, d_model, device=device, dtype=dtype)
        self.x.requires_grad_()
        self.mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        self.grad_out = torch.randn(batch, d_model, device=device, dtype=dtype)

    def call(self, backend: str) -> Callable[[Tensor, list[LevelParams]], Tensor]:
        """``(x, params) -> user vectors`` on ``backend``."""
        strides, heads, mask = self.strides, self.heads, self.mask

        def run(x: Tensor, params: list[LevelParams]) -> Tensor:
            out = downscale(
                x, params, strides, heads, mask, dropout=0.1, training=True, backend=backend
            )
            return out.user

        return run


def providers(device: str) -> dict[str, str]:
    """Provider name -> backend; "compiled" is the reference under torch.compile."""
    native = "cuda" if device == "cuda" else "cpp"
    names = {"reference": "reference", "compiled": "reference"}
    if extension_status() is None:
        names[native] = native
    return names


def step_fn(case: Case, provider: str, backend: str) -> Callable[[], None]:
    """One forward + backward of the op (gradients of x and all parameters, not accumulated)."""
    fn = case.call(backend)
    if provider == "compiled":
        fn = torch.compile(fn, fullgraph=True, dynamic=False)
    wrt = [case.x, *case.leaves]

    def step() -> None:
        user = fn(case.x, case.params)
        torch.autograd.grad(user, wrt, case.grad_out)

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


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
    case = Case(batch, length, d_model, device, dtype)
    steps = {name: step_fn(case, name, backend) for name, backend in providers(device).items()}
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, backend in providers(device).items():
        fn = case.call(backend)
        if name == "compiled":
            fn = torch.compile(fn, fullgraph=True, dynamic=False)
        saved = saved_tensor_bytes(lambda f=fn: f(case.x, case.params), case.leaves)
        rows.append(
            {
                "L": length,
                "B": batch,
                "D": d_model,
                "levels": " ".join(f"{k}/{s}" for k, s in case.levels),
                "provider": name,
                "median_ms": statistics.median(times[name]) * 1e3,
                "min_ms": min(times[name]) * 1e3,
                "max_ms": max(times[name]) * 1e3,
                "saved_MiB": saved / 2**20,
            }
        )
    return rows


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(rows: list[dict], command: str, device: str, dtype: str, repeats: int) -> str:
    """The side-by-side table: times, ratios against the extension, saved bytes."""
    native = "cuda" if device == "cuda" else "cpp"
    threads = torch.get_num_threads()
    lines = [
        f"`downscale` forward+backward, {device} {dtype}, torch {torch.__version__}, "
        f"{threads} threads, {cpu_name()}; median of "
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 512, 4096])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/downscale_cpu")
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
    command = " ".join(["python", "benchmarks/downscale_table.py", *(argv or sys.argv[1:])])
    table = markdown(rows, command.strip(), args.device, args.dtype, args.repeats)
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
