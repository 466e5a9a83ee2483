"""Next-item losses: full softmax over the catalogue, or sampled softmax with N negatives.

The full-softmax losses never build the score matrix: the model returns user vectors and the
item table, and ``all_items_cross_entropy`` scores them chunk by chunk."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convrec.ops.all_items import all_items_cross_entropy


def full_softmax_loss(
    model: nn.Module, item_ids: Tensor, targets: Tensor, timestamps: Tensor | None
) -> Tensor:
    """Cross-entropy of the target against every item (padding excluded).

    ``model`` is a ``SequentialRecommender`` or a wrapper of one (DDP): it is called, not
    asked for ``.score``, so the wrapper sees the forward pass.
    """
    users, items = model(item_ids, None, timestamps, users_and_items=True)
    return all_items_cross_entropy(users, items, targets)


def sampled_softmax_loss(
    model: nn.Module,
    item_ids: Tensor,
    targets: Tensor,
    timestamps: Tensor | None,
    negatives: int,
    num_items: int,
    generator: torch.Generator,
    target_timestamps: Tensor | None = None,
) -> Tensor:
    """Cross-entropy of the target against ``negatives`` uniform items (the paper's 100).

    A negative that happens to equal the target is masked out rather than counted.
    ``target_timestamps`` go to models that give candidates the target's date.
    """
    negs = torch.randint(1, num_items + 1, (len(targets), negatives), generator=generator)
    negs = negs.to(targets.device)
    candidates = torch.cat([targets[:, None], negs], dim=1)
    extra = {} if target_timestamps is None else {"target_timestamps": target_timestamps}
    scores = model(item_ids, candidates, timestamps, **extra)
    scores[:, 1:] = scores[:, 1:].masked_fill(negs == targets[:, None], float("-inf"))
    return F.cross_entropy(scores, torch.zeros_like(targets))


def all_positions_loss(
    model: nn.Module, item_ids: Tensor, targets: Tensor, timestamps: Tensor | None
) -> Tensor:
    """Full-softmax cross-entropy of the next item at every trained slot of (B, L) windows,
    from one forward of a causal model (``targets`` (B, L) from
    ``SequenceIndex.window_targets``: 0 at padding and at slots that are context only)."""
    slots = targets != 0
    users, items = model(
        item_ids, None, timestamps, every_position=True, slots=slots, users_and_items=True
    )
    return all_items_cross_entropy(users, items, targets[slots])
