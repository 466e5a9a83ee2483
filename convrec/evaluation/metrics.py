"""Ranking metrics from the target's rank; ties count against the model."""

from __future__ import annotations

import torch
from torch import Tensor

KS = (1, 5, 10, 20)


def rank_of_target(target_scores: Tensor, other_scores: Tensor) -> Tensor:
    """0-based rank of each target among its candidates: every other candidate scoring higher
    or equal is ranked before it (a pessimistic tie-break, so constant scores earn nothing).

    ``target_scores`` (S,), ``other_scores`` (S, C) without the target itself.
    """
    if torch.isnan(target_scores).any() or torch.isnan(other_scores).any():
        raise ValueError("scores contain NaN; the model diverged or received invalid inputs")
    return (other_scores >= target_scores.unsqueeze(1)).sum(1)


class RankingMetrics:
    """Accumulates HR@k, NDCG@k (one relevant item) and MRR over batches of ranks."""

    def __init__(self, ks: tuple[int, ...] = KS) -> None:
        self.ks = ks
        self.count = 0
        self.sums = {f"HR@{k}": 0.0 for k in ks} | {f"NDCG@{k}": 0.0 for k in ks} | {"MRR": 0.0}

    def add(self, ranks: Tensor) -> None:
        ranks = ranks.to(torch.float64)
        for k in self.ks:
            hit = ranks < k
            self.sums[f"HR@{k}"] += float(hit.sum())
            self.sums[f"NDCG@{k}"] += float((hit / torch.log2(ranks + 2)).sum())
        self.sums["MRR"] += float((1.0 / (ranks + 1)).sum())
        self.count += len(ranks)

    def result(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no ranks were added")
        return {name: total / self.count for name, total in self.sums.items()}
