"""Next-item losses: full softmax over the catalogue, or sampled softmax with N negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from convrec.recommender import SequentialRecommender


def full_softmax_loss(
    model: SequentialRecommender, item_ids: Tensor, targets: Tensor, timestamps: Tensor | None
) -> Tensor:
    """Cross-entropy of the target against every item (the padding column scores -inf)."""
    return F.cross_entropy(model.score(item_ids, timestamps=timestamps), targets)


def sampled_softmax_loss(
    model: SequentialRecommender,
    item_ids: Tensor,
    targets: Tensor,
    timestamps: Tensor | None,
    negatives: int,
    generator: torch.Generator,
) -> Tensor:
    """Cross-entropy of the target against ``negatives`` uniform items (the paper's 100).

    A negative that happens to equal the target is masked out rather than counted.
    """
    negs = torch.randint(1, model.num_items + 1, (len(targets), negatives), generator=generator).to(
        targets.device
    )
    scores = model.score(item_ids, torch.cat([targets[:, None], negs], dim=1), timestamps)
    scores[:, 1:] = scores[:, 1:].masked_fill(negs == targets[:, None], float("-inf"))
    return F.cross_entropy(scores, torch.zeros_like(targets))
