"""Ranking metrics from the target's rank; ties count against the model."""

from __future__ import annotations

import torch
from torch import Tensor

KS = (1, 5, 10, 20)
# The keys of ``ranking_metrics`` (with the default ``ks``), known before anything is ranked.
METRIC_NAMES = (*(f"HR@{k}" for k in KS), *(f"NDCG@{k}" for k in KS), "MRR")


def rank_of_target(target_scores: Tensor, other_scores: Tensor) -> Tensor:
    """0-based rank of each target among its candidates: every other candidate scoring higher
    or equal is ranked before it (a pessimistic tie-break, so constant scores earn nothing).

    ``target_scores`` (S,), ``other_scores`` (S, C) without the target itself.
    """
    if torch.isnan(target_scores).any() or torch.isnan(other_scores).any():
        raise ValueError("scores contain NaN; the model diverged or received invalid inputs")
    return (other_scores >= target_scores.unsqueeze(1)).sum(1)


def rank_excluding(scores: Tensor, target_scores: Tensor, excluded: Tensor) -> Tensor:
    """0-based rank of each target among the columns of ``scores`` (S, N) but ``excluded``
    (S, E) column ids (any order, repeats allowed; they must hold the target's own column):
    every other column scoring higher or equal counts, as in ``rank_of_target``.

    Equal to ``rank_of_target`` over the scores with the excluded columns removed, computed
    as one compare-and-count pass over ``scores`` less the excluded columns that count, so the
    (S, N) matrix is never copied (full-ranking evaluation masks a few dozen columns of
    thousands). Raises on NaN anywhere in ``scores`` or ``target_scores``.
    """
    if torch.isnan(target_scores).any() or (
        torch.isnan(scores.sum(1)).any() and torch.isnan(scores).any()  # a cheap pass first
    ):
        raise ValueError("scores contain NaN; the model diverged or received invalid inputs")
    threshold = target_scores.unsqueeze(1)
    ids, _ = excluded.sort(1)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]  # each excluded column subtracted once
    counted = (scores.gather(1, ids) >= threshold) & first
    at_or_above = (scores >= threshold).view(torch.uint8).sum(1, dtype=torch.int64)
    return at_or_above - counted.sum(1)


def ranking_metrics(ranks: Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """HR@k, NDCG@k (one relevant item) and MRR averaged over 0-based ``ranks``.

    Computed in one float64 pass over all ranks, so the result does not depend on how the
    evaluation was batched or sharded across processes.
    """
    if ranks.numel() == 0:
        raise ValueError("no ranks to average")
    ranks = ranks.to(torch.float64)
    metrics = {}
    for k in ks:
        metrics[f"HR@{k}"] = float((ranks < k).to(torch.float64).mean())
    for k in ks:
        metrics[f"NDCG@{k}"] = float(((ranks < k) / torch.log2(ranks + 2)).mean())
    metrics["MRR"] = float((1.0 / (ranks + 1)).mean())
    return metrics
