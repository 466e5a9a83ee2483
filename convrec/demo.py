"""``convrec demo``: ConvRec and SASRec trained side by side on the built-in synthetic data."""

from __future__ import annotations

import pathlib

from convrec.baselines.popularity import Popularity
from convrec.data.splits import SequenceIndex
from convrec.evaluation.protocols import evaluate, format_metrics
from convrec.training.config import TrainConfig
from convrec.training.trainer import load_training_data, train


def run_demo(
    out: pathlib.Path,
    seconds: float = 75.0,
    seed: int = 0,
    progress: bool = True,
    synthetic: dict | None = None,
) -> dict[str, dict]:
    """Train both models for about ``seconds`` each, print their test metrics next to a
    popularity ranking, and return the summaries (their runs stay in ``out``).
    ``synthetic`` overrides the generator's options (tests use a tiny dataset)."""
    print(f"convrec demo: runs in {out}")
    base = TrainConfig(
        train_sampling="all-prefixes",
        epochs=200,
        patience=5,
        time_budget=seconds,
        seed=seed,
        synthetic=synthetic,
    )
    data = load_training_data(base)
    stats = data.stats()
    print(
        f"synthetic data: {stats['users']} users, {stats['items']} items, "
        f"{stats['attributes']} attributes, median history {stats['length_median']:.0f}"
    )
    train_parts = [s[:-2] for s in data.sequences]
    popularity = evaluate(
        Popularity.from_sequences(train_parts, data.num_items),
        data,
        "test",
        index=SequenceIndex.from_dataset(data),
    )
    summaries = {"popularity": {"test": popularity}}
    for model in ("convrec", "sasrec"):
        config = TrainConfig.from_dict(base.to_dict() | {"model": model})
        summaries[model] = train(config, out / model, progress=progress)
    print()
    for name, summary in summaries.items():
        title = f"## {name}"
        if "parameters" in summary:
            title += (
                f" ({summary['parameters']:,} parameters, {summary['epochs_trained']} epochs, "
                f"{summary['seconds_per_epoch']:.1f} s/epoch, best epoch {summary['best_epoch']})"
            )
        print(format_metrics(summary["test"], data, title) + "\n")
    print("| model | full HR@10 | full NDCG@10 | sampled HR@10 | sampled NDCG@10 |")
    print("|---|---|---|---|---|")
    for name, summary in summaries.items():
        t = summary["test"]
        print(
            f"| {name} | {t['full/HR@10']:.4f} | {t['full/NDCG@10']:.4f} "
            f"| {t['sampled/HR@10']:.4f} | {t['sampled/NDCG@10']:.4f} |"
        )
    return summaries
