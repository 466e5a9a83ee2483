"""Full-ranking NDCG@10 of trained checkpoints on the validation and test targets, per bucket of
history length: where a gap between two models, or between a model's validation and test
scores, comes from.

    python -m benchmarks.ranks_by_history_length NAME=RUN/best.pt NAME=RUN/best.pt [--out DIR]

Each checkpoint is evaluated on the data it was trained on, as ``convrec evaluate`` does (same
histories of the last ``max_len`` items, same ranks); the bucket is the number of items before
the target, before truncation. Prints a Markdown table; ``--out`` also writes it to
``DIR/ranks_by_history_length.md``.
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


def ndcg_per_user(checkpoint: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(NDCG@10 per user, history length per user) of ``split``'s targets."""
    _, config, model = _load_for_inference(checkpoint, None)
    data = _training_data(config, None)
    index = SequenceIndex.from_dataset(data)
    cuts = index.split_cuts(split)
    ranks = []
    for start in range(0, data.num_users, config.eval_batch_size):
        users = np.arange(start, min(start + config.eval_batch_size, data.num_users))
        found = _batch_ranks(
            model, index, None, users, cuts[users], ("full",), config.max_len, "cpu"
        )
        ranks.append(found["full"])
    r = torch.cat(ranks).double()
    return ((r < 10) / torch.log2(r + 2)).numpy(), cuts


def table(runs: dict[str, str]) -> str:
    names = list(runs)
    lines = [
        "| split | history length | users | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for split in SPLITS:
        scores = {name: ndcg_per_user(path, split) for name, path in runs.items()}
        lengths = next(iter(scores.values()))[1]
        for low, high in (*BUCKETS, (1, None)):
            chosen = (lengths >= low) & (lengths < (high or np.inf))
            label = "all" if (low, high) == (1, None) else f"{low}-{high - 1 if high else ''}"
            cells = " | ".join(f"{scores[n][0][chosen].mean():.4f}" for n in names)
            lines.append(f"| {split} | {label} | {int(chosen.sum())} | {cells} |")
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    runs = dict(args.runs)
    text = table(runs)
    print(text, end="")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ranks_by_history_length.md").write_text(text)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
