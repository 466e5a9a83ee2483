"""One encoder training step (forward + backward) per history length, dtype and implementation,
side by side in one process: the table the GPU issue is judged by.

    python -m benchmarks.encoder_step --device cuda --out DIR        # the GPU table
    python -m benchmarks.encoder_step --device cpu --lengths 50 512 --dtypes fp32 --out DIR

Series: ``ConvRecEncoder.for_length(L, D)`` on each backend ("reference", "triton", "cuda" or
"cpp"), the same under ``torch.compile`` ("compiled-<backend>", CUDA graphs on CUDA, as
``convrec train --compile`` runs it), and SASRec's 2-block ``TransformerEncoder`` with
``scaled_dot_product_attention`` ("sasrec-sdpa": FlashAttention on a GPU), and the streaming
encoder's all-positions pass on a backend ("streaming-<backend>": ``forward_positions``, the
user vector after every position, what ``all-positions`` training runs, in the in-place layout;
"streaming-newest-last-<backend>" is that pass with ``newest_last=True``, the streaming
default). Inputs (B, L, D)
and weights in the dtype, dropout 0.1, loss = mean of the squared outputs. Times are medians of
CUDA-event (or wall-clock) timings after warm-up; peak memory is the allocator's peak (GPU only).
The memory floor is the time to move 3·B·L·D elements at the measured copy rate (a
forward+backward that recomputes rather than saves reads x twice and writes its gradient once);
"floor" = floor time / step time. A series stops at its first out-of-memory length, and the
sweep skips what is left once ``--budget-s`` is spent, so it ends in bounded time.
Writes ``encoder_step.csv`` and ``encoder_step.md``.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.machine import machine_info
from convrec import ConvRecEncoder
from convrec.baselines.sasrec import TransformerEncoder
from convrec.ops.dispatch import unavailable
from convrec.training.allocator import keep_freed_memory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_LENGTHS = (50, 200, 512, 2048, 8192, 32768, 131072)
GPU_SERIES = ("reference", "triton", "cuda", "compiled-cuda", "compiled-triton", "sasrec-sdpa")
GPU_SERIES += ("streaming-cuda",)
COPY_BYTES_PER_S = 4.3e12  # device-to-device copy measured on the H200 (2026-11-30)
COLUMNS = ("series", "L", "dtype", "B", "D", "ms", "low_ms", "high_ms", "peak_mib", "floor")
COLUMNS += ("status", "detail")
SLOW_STEP_S = 0.2  # slower steps get fewer repeats, so the sweep fits a short device lease


def make_step(series: str, length: int, args: argparse.Namespace) -> Callable[[], None]:
    """A closure running one forward + backward of ``series`` on fresh inputs of length L."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype_name]
    if series == "sasrec-sdpa":
        model: torch.nn.Module = TransformerEncoder(args.d_model, length, 2, 2, 0.1, "sdpa")
    else:
        streaming = series.startswith("streaming-")
        newest_last = series.startswith("streaming-newest-last-")
        backend = series.removeprefix("compiled-").removeprefix("streaming-")
        backend = backend.removeprefix("newest-last-")
        reason = unavailable(backend, device)
        if reason is not None:
            raise LookupError(reason)
        model = ConvRecEncoder.for_length(
            length,
            args.d_model,
            backend=backend,
            dropout=0.1,
            streaming=streaming,
            newest_last=newest_last,
        )
    model = model.to(device=device, dtype=dtype).train()
    x = torch.randn(args.batch, length, args.d_model, device=device, dtype=dtype)
    x.requires_grad_()
    mask = torch.ones(args.batch, length, dtype=torch.bool, device=device)

    encode = model.forward_positions if series.startswith("streaming-") else model

    def step(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return encode(x, mask).float().square().mean()

    if series.startswith("compiled-"):
        mode = "reduce-overhead" if device.type == "cuda" else None
        step = torch.compile(step, mode=mode, dynamic=False)

    def run() -> None:
        model.zero_grad(set_to_none=True)
        x.grad = None
        step(x, mask).backward()

    return run


def time_step(run: Callable[[], None], device: torch.device, repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` calls after warm-up (fewer of both for slow steps)."""
    cuda = device.type == "cuda"

    def once() -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        run()
        return (time.perf_counter() - begin) * 1e3

    first = once()  # compiles, autotunes, allocates
    warm = [once() for _ in range(1 if first > SLOW_STEP_S * 1e3 else 2)]
    count = max(3, repeats // 2) if warm[-1] > SLOW_STEP_S * 1e3 else repeats
    return [once() for _ in range(count)]


def measure(series: str, length: int, args: argparse.Namespace) -> dict:
    """One row of the table: median step time, spread, peak memory and the floor fraction."""
    device = torch.device(args.device)
    row = dict(series=series, L=length, dtype=args.dtype_name, B=args.batch, D=args.d_model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        times = time_step(make_step(series, length, args), device, args.repeats)
    except LookupError as error:
        return row | dict(status="unavailable", detail=str(error))
    except torch.OutOfMemoryError as error:
        return row | dict(status="oom", detail=str(error).splitlines()[0][:160])
    median = statistics.median(times)
    row |= dict(ms=median, low_ms=min(times), high_ms=max(times), status="ok", detail="")
    if device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        floor_bytes = 3 * args.batch * length * args.d_model * DTYPES[args.dtype_name].itemsize
        row["floor"] = floor_bytes / COPY_BYTES_PER_S * 1e3 / median
    return row


def sweep(args: argparse.Namespace) -> list[dict]:
    """Every (dtype, L, series) within the budget; a series ends at its first out-of-memory."""
    start, rows, stopped = time.perf_counter(), [], set()
    for dtype_name in args.dtypes:
        args.dtype_name = dtype_name
        for length in args.lengths:
            for series in args.series:
                key = (series, dtype_name)
                base = dict(series=series, L=length, dtype=dtype_name, B=args.batch, D=args.d_model)
                if key in stopped:
                    rows.append(
                        base | dict(status="skipped", detail="out of memory at a shorter L")
                    )
                elif time.perf_counter() - start > args.budget_s:
                    rows.append(base | dict(status="skipped", detail="time budget spent"))
                else:
                    rows.append(measure(series, length, args))
                    if rows[-1]["status"] == "oom":
                        stopped.add(key)
                print(_line(rows[-1]), flush=True)
    return rows


def _line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['series']:>16} {row['dtype']} L={row['L']}: {row['status']} {row['detail']}"
    extra = f" ({row['peak_mib']:.0f} MiB, floor {row['floor']:.1%})" if "floor" in row else ""
    return f"{row['series']:>16} {row['dtype']} L={row['L']}: {row['ms']:.3f} ms{extra}"


def write(rows: list[dict], out: pathlib.Path, command: str, device: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "encoder_step.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    series = list(dict.fromkeys(r["series"] for r in rows))
    lines = [
        "# Encoder training step (forward + backward)",
        "",
        f"Command: `{command}`. Machine: "
        + ", ".join(f"{k} {v}" for k, v in machine_info(device).items() if v)
        + ".",
        "",
        "Median ms per step (peak MiB, fraction of the memory floor); see the module docstring.",
        "",
        "| L | dtype | " + " | ".join(series) + " |",
        "|---|---|" + "---|" * len(series),
    ]
    for key in dict.fromkeys((r["L"], r["dtype"]) for r in rows):
        cells = {r["series"]: _cell(r) for r in rows if (r["L"], r["dtype"]) == key}
        lines.append(f"| {key[0]:,} | {key[1]} | " + " | ".join(cells[s] for s in series) + " |")
    (out / "encoder_step.md").write_text("\n".join(lines) + "\n")


def _cell(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    extra = f" ({row['peak_mib']:,.0f}, {row['floor']:.0%})" if "floor" in row else ""
    return f"{row['ms']:.3g}{extra}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.encoder_step", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(GPU_LENGTHS))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--series", nargs="+", default=None, help=f"default {GPU_SERIES} on cuda")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget-s", type=float, default=150.0, help="then skip what is left")
    parser.add_argument("--out", required=True, help="folder for encoder_step.csv and .md")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="CPU: keep freed blocks in the process as `convrec train` does "
        "(convrec.training.allocator), so re-allocated tensors are not page-faulted in again",
    )
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.series is None:
        args.series = list(GPU_SERIES) if args.device == "cuda" else ["reference", "cpp"]
    torch.manual_seed(0)
    rows = sweep(args)
    command = "python -m benchmarks.encoder_step " + " ".join(argv or sys.argv[1:])
    write(rows, pathlib.Path(args.out), command, args.device)


if __name__ == "__main__":
    main()
