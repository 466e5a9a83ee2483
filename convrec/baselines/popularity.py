"""Most-popular ranking: the floor every sequential model has to clear."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Popularity(nn.Module):
    """Scores every item by its number of training interactions, whatever the history."""

    def __init__(self, counts: Tensor) -> None:
        super().__init__()
        self.register_buffer("counts", counts.to(torch.float32))

    @classmethod
    def from_sequences(cls, sequences: list, num_items: int) -> Popularity:
        """Counts of each item over ``sequences`` (the training parts of users' histories)."""
        counts = torch.zeros(num_items + 1)
        for seq in sequences:
            counts.index_add_(0, torch.as_tensor(seq, dtype=torch.long), torch.ones(len(seq)))
        return cls(counts)

    def score(
        self, item_ids: Tensor, candidates: Tensor | None = None, timestamps: Tensor | None = None
    ) -> Tensor:
        if candidates is None:
            return self.counts.expand(item_ids.shape[0], -1).clone()
        return self.counts[candidates]
