"""One table of finished training runs, grouped by setting over seeds: the tuning grids of the
reports that were trained with plain ``convrec train`` commands rather than an accuracy plan.

    python -m benchmarks.run_summaries RUNS/*_s[0-9]* --csv OUT.csv [--md OUT.md] [--png OUT.png]

A run folder is named ``NAME_sSEED``; runs of one NAME are one setting. Each row of the CSV is
one run (its best validation full NDCG@10 and the test metrics of its best checkpoint, from
``summary.json``); the Markdown table gives each setting's mean ± standard deviation over its
seeds, best validation first; the plot puts each setting's mean validation against its mean
test full NDCG@10 (whether validation ranks the settings as test does), labelled with the
setting and its seed count.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import pathlib
import re
import statistics

from benchmarks.accuracy import mean_std

RUN_NAME = re.compile(r"(?P<name>.+)_s(?P<seed>\d+)")
COLUMNS = (
    "valid/full/NDCG@10",
    "test/full/HR@10",
    "test/full/NDCG@10",
    "test/sampled/HR@10",
    "test/sampled/NDCG@10",
)


def run_row(folder: pathlib.Path) -> dict:
    """The folder's setting, seed, metrics and epochs; ValueError names a folder that is not a
    finished run called ``NAME_sSEED``, or a summary without the metrics (a run selected on
    another validation metric has no ``best_valid/full/NDCG@10``)."""
    match = RUN_NAME.fullmatch(folder.name)
    if match is None:
        raise ValueError(f"{folder}: run folders are named NAME_sSEED")
    summary_file = folder / "summary.json"
    if not summary_file.is_file():
        raise ValueError(f"{folder}: no summary.json (the run has not finished)")
    try:
        summary = json.loads(summary_file.read_text())
        test = summary["test"]
        return {
            "name": match["name"],
            "seed": int(match["seed"]),
            "valid/full/NDCG@10": summary["best_valid/full/NDCG@10"],
            **{c: test.get(c.removeprefix("test/"), float("nan")) for c in COLUMNS[1:]},
            "epochs": summary["epochs_trained"],
            "best_epoch": summary["best_epoch"],
        }
    except json.JSONDecodeError as error:
        raise ValueError(f"{summary_file}: not JSON ({error})") from None
    except KeyError as error:  # e.g. a run early-stopped on another metric
        raise ValueError(f"{summary_file}: no {error.args[0]!r}") from None


def _cell(values: list[float]) -> str:
    """Mean ± sd, or n/a where a run lacks the metric (a run evaluated on full ranking only)."""
    return "n/a" if any(math.isnan(v) for v in values) else mean_std(values)


def markdown(rows: list[dict]) -> str:
    """Mean ± sd per setting over its seeds, sorted by validation, best first."""
    names = sorted({r["name"] for r in rows})
    groups = {
        n: sorted((r for r in rows if r["name"] == n), key=lambda r: r["seed"]) for n in names
    }
    order = sorted(
        names, key=lambda n: -statistics.mean(r["valid/full/NDCG@10"] for r in groups[n])
    )
    lines = [
        "| setting | seeds | " + " | ".join(COLUMNS) + " | epochs (best) |",
        "|---|---|" + "---|" * len(COLUMNS) + "---|",
    ]
    for n in order:
        runs = groups[n]
        cells = [_cell([r[c] for r in runs]) for c in COLUMNS]
        epochs = ", ".join(f"{r['epochs']} ({r['best_epoch']})" for r in runs)
        seeds = ",".join(str(r["seed"]) for r in runs)
        lines.append(f"| {n} | {seeds} | " + " | ".join(cells) + f" | {epochs} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: pathlib.Path, reference: tuple[float, float] | None) -> None:
    """Mean validation (x) against mean test (y) full NDCG@10 per setting; ``reference`` is
    another model's (validation, test), drawn as two dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name in sorted({r["name"] for r in rows}):
        runs = [r for r in rows if r["name"] == name]
        x = statistics.mean(r["valid/full/NDCG@10"] for r in runs)
        y = statistics.mean(r["test/full/NDCG@10"] for r in runs)
        ax.scatter(x, y, color="tab:blue")
        ax.annotate(f"{name} ({len(runs)})", (x, y), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    if reference is not None:
        ax.axvline(reference[0], color="gray", linestyle="--", linewidth=1, label="reference")
        ax.axhline(reference[1], color="gray", linestyle="--", linewidth=1)
        ax.legend(loc="lower right")
    ax.set_xlabel("validation full NDCG@10 (mean over seeds)")
    ax.set_ylabel("test full NDCG@10 (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=pathlib.Path, help="run folders NAME_sSEED")
    parser.add_argument("--csv", type=pathlib.Path, required=True, help="one row per run")
    parser.add_argument("--md", type=pathlib.Path, help="also write the table here")
    parser.add_argument("--png", type=pathlib.Path, help="also plot validation against test")
    parser.add_argument(
        "--reference",
        type=float,
        nargs=2,
        metavar=("VALID", "TEST"),
        help="with --png: another model's validation and test full NDCG@10, drawn as lines",
    )
    args = parser.parse_args()
    try:
        rows = sorted((run_row(f) for f in args.runs), key=lambda r: (r["name"], r["seed"]))
    except ValueError as error:
        parser.error(str(error))
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows)
    print(text, end="")
    if args.md is not None:
        args.md.write_text(text)
    if args.png is not None:
        plot(rows, args.png, args.reference)


if __name__ == "__main__":
    main()
