"""``AttentionReadout``: one query per user over its history, added to ConvRec's user vector.

Not in the paper. The levels pool the history by position only, so in a long history the
items that matter for the next one are averaged with everything else; a single query (made
from the user vector) attending over the history item vectors picks them by content. One
query per user keeps the cost linear in the history length, like the levels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Added to the scores of padding slots: exp() of it underflows to 0 in every float dtype. An
# all-padding history (zero vectors) then averages zeros, where -inf would give NaN.
_PAD_SCORE = -1.0e4


class AttentionReadout(nn.Module):
    """``u -> out(softmax(q(u) . x / sqrt(D)) @ x)`` over the real slots of ``x``.

    ``out`` starts at zero, so a model with the readout starts as the model without it.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.query = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model, bias=False)  # an empty history adds nothing
        nn.init.zeros_(self.out.weight)

    def forward(self, user: Tensor, x: Tensor, mask: Tensor) -> Tensor:
        """``user`` (B, D), history vectors ``x`` (B, L, D) zero at padding, ``mask`` (B, L)
        -> the term to add to ``user``, (B, D)."""
        scores = torch.einsum("bd,bld->bl", self.query(user), x) / math.sqrt(x.shape[-1])
        weights = scores.masked_fill(~mask, _PAD_SCORE).softmax(-1)
        return self.out(torch.einsum("bl,bld->bd", weights, x))
