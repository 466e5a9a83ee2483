"""Full-ranking NDCG@10 of trained checkpoints on the validation and test targets, per bucket of
history length: where a gap between two models, or between a model's validation and test
scores, comes from.

    python -m benchmarks.ranks_by_history_length NAME=RUN/best.pt NAME=RUN/best.pt \
        [--without-newest K] [--out DIR]

Each checkpoint is evaluated on the data it was trained on, as ``convrec evaluate`` does (same
histories of the last ``max_len`` items, same ranks); the bucket is the number of items before
the target, before truncation. ``--without-newest K`` scores each target from its history
without its K newest items (still ranking against every item before the target as seen): how
much a model draws from the newest events. With two checkpoints a last column gives the second's
per-user NDCG minus the first's, with its standard error over users. Prints a Markdown table;
``--out`` also writes it to ``DIR/ranks_by_history_length.md``.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
import torch

from convrec.cli import _load_for_inference, _training_data
from convrec.data.splits import SequenceIndex
from convrec.evaluation.protocols import _batch_ranks

BUCKETS = ((1, 10), (10, 30), (30, 50), (50, None))
SPLITS = ("valid", "test")


def ndcg_per_user(
    checkpoint: str, split: str, without_newest: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(NDCG@10 per user, history length per user) of ``split``'s targets, scored from the
    history without its ``without_newest`` newest items."""
    _, config, model = _load_for_inference(checkpoint, None)
    data = _training_data(config, None)
    index = SequenceIndex.from_dataset(data)
    cuts = index.split_cuts(split)
    ranks = []
    for start in range(0, data.num_users, config.eval_batch_size):
        users = np.arange(start, min(start + config.eval_batch_size, data.num_users))
        history_cuts = np.maximum(cuts[users] - without_newest, 0)
        found = _batch_ranks(
            model, index, None, users, cuts[users], ("full",), config.max_len, "cpu", history_cuts
        )
        ranks.append(found["full"])
    r = torch.cat(ranks).double()
    return ((r < 10) / torch.log2(r + 2)).numpy(), cuts


def table(runs: dict[str, str], without_newest: int = 0) -> str:
    names = list(runs)
    paired = len(names) == 2
    difference = [f"{names[1]} - {names[0]} (± SE over users)"] if paired else []
    lines = [
        "| split | history length | users | " + " | ".join(names + difference) + " |",
        "|---|---|---|" + "---|" * (len(names) + paired),
    ]
    for split in SPLITS:
        scores = {n: ndcg_per_user(path, split, without_newest) for n, path in runs.items()}
        lengths = next(iter(scores.values()))[1]
        for low, high in (*BUCKETS, (1, None)):
            chosen = (lengths >= low) & (lengths < (high or np.inf))
            label = "all" if (low, high) == (1, None) else f"{low}-{high - 1 if high else ''}"
            cells = " | ".join(f"{scores[n][0][chosen].mean():.4f}" for n in names)
            if paired:
                cells += " | " + paired_difference(*(scores[n][0][chosen] for n in names))
            lines.append(f"| {split} | {label} | {int(chosen.sum())} | {cells} |")
    return "\n".join(lines) + "\n"


def paired_difference(first: np.ndarray, second: np.ndarray) -> str:
    """Mean per-user difference ``second - first`` and its standard error over users: how far
    the two models' gap on this set could move with other users' targets (seeds aside)."""
    d = second - first
    se = d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else float("nan")
    return f"{d.mean():+.4f} ± {se:.4f}"


def named_checkpoint(text: str) -> tuple[str, str]:
    """``NAME=PATH`` of an existing file -> (NAME, PATH); argparse prints the error otherwise."""
    name, _, path = text.partition("=")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=path/to/best.pt, got {text!r}")
    if not pathlib.Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{path}: no such checkpoint file")
    return name, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=named_checkpoint, help="NAME=path/to/best.pt")
    parser.add_argument(
        "--without-newest",
        type=int,
        default=0,
        metavar="K",
        help="score each target without the K newest items of its history (default 0)",
    )
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if args.without_newest < 0:
        parser.error(f"--without-newest must be >= 0, got {args.without_newest}")
    runs = dict(args.runs)
    text = table(runs, args.without_newest)
    print(text, end="")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ranks_by_history_length.md").write_text(text)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
