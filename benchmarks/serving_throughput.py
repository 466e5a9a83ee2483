"""Requests per second of ``Recommender.recommend``: ConvRec vs SASRec, side by side.

A Beauty-sized catalogue (12,101 items, 637 attributes, 3-4 per item), batches of 256
histories of length 50, D = 64, top-10 with seen items excluded. Weights are random (speed does
not depend on training). Writes CSV + Markdown to --out.

    python -m benchmarks.serving_throughput --out benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import platform
import statistics
import sys
import time

import torch

from convrec import ConvRec, SASRec
from convrec.serving import Recommender


def _attributes(num_items: int, num_attributes: int, generator: torch.Generator) -> list[list[int]]:
    counts = torch.randint(3, 5, (num_items,), generator=generator).tolist()
    return [[]] + [
        torch.randint(0, num_attributes, (c,), generator=generator).tolist() for c in counts
    ]


def measure(num_items: int, batch: int, length: int, d_model: int, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    attrs = _attributes(num_items, 637, g)
    item_ids = [""] + [str(i) for i in range(1, num_items + 1)]
    models = {
        "ConvRec": ConvRec(num_items, d_model, item_attributes=attrs),
        "SASRec (2 blocks, SDPA)": SASRec(
            num_items, d_model, max_len=length, item_attributes=attrs
        ),
    }
    histories = torch.randint(1, num_items + 1, (batch, length), generator=g).tolist()
    histories = [[str(i) for i in row] for row in histories]
    rows = []
    for name, model in models.items():
        recommender = Recommender.from_model(model, item_ids, max_len=length)
        recommender.recommend(histories, k=10)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            recommender.recommend(histories, k=10)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        rows.append(
            {
                "model": name,
                "items": num_items,
                "batch": batch,
                "L": length,
                "D": d_model,
                "median_ms_per_batch": 1e3 * median,
                "min_ms": 1e3 * min(times),
                "max_ms": 1e3 * max(times),
                "requests_per_second": batch / median,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=12101)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=pathlib.Path, help="folder for serving_cpu.csv/.md")
    args = parser.parse_args()
    rows = measure(args.items, args.batch, args.length, args.d_model, args.repeats)
    lines = [
        "# Recommender.recommend throughput (CPU)",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}; "
        f"{args.items} items, batch {args.batch}, L={args.length}, D={args.d_model}, top-10, seen "
        f"items excluded; median of {args.repeats} batches (min..max).",
        "",
        "| model | ms per batch | requests/s |",
        "|---|---|---|",
    ]
    for r in rows:
        spread = f"{r['min_ms']:.1f}..{r['max_ms']:.1f}"
        lines.append(
            f"| {r['model']} | {r['median_ms_per_batch']:.1f} ({spread}) "
            f"| {r['requests_per_second']:.0f} |"
        )
    ratio = rows[0]["requests_per_second"] / rows[1]["requests_per_second"]
    lines += [
        "",
        f"ConvRec serves {ratio:.2f}x the requests per second of SASRec.",
        "",
        f"Command: `python -m benchmarks.serving_throughput {' '.join(sys.argv[1:])}`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "serving_cpu.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (args.out / "serving_cpu.md").write_text(text)


if __name__ == "__main__":
    main()
