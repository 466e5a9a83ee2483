"""Serving a streaming ConvRec one event at a time: each user's state in, the new state out.

``ConvRec(streaming=True)`` anchors its windows at a user's first event, so a new event changes
only the open window of each level: ``StreamingModule`` updates a batch of users by one event
each at O(levels) cost, whatever their history lengths, and scores the whole catalogue from a
frozen item table. Its inputs and outputs are plain tensors (``ops.stream_downscale.pack_state``),
so it exports with ``torch.export``. ``StreamingRecommender`` keeps the states of a population
of users in one pooled tensor indexed by user and serves pushes from it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from convrec.model import ConvRec
from convrec.ops.stream_downscale import pack_state, unpack_state


class StreamingModule(nn.Module):
    """(events (B,), packed states (B, S), new item ids (B,)) -> (events + 1, new packed states,
    user vectors (B, D), top-k scores (B, k), top-k item ids (B, k))."""

    def __init__(self, model: ConvRec, k: int) -> None:
        super().__init__()
        if not model.encoder.streaming:
            raise ValueError("StreamingModule serves a streaming model: ConvRec(streaming=True)")
        if model.item_encoder.use_time:
            raise ValueError("streaming serving does not support time-context models yet")
        if not 1 <= k <= model.num_items:
            raise ValueError(f"k must be in [1, {model.num_items}], got {k}")
        self.k, self.levels = k, len(model.encoder.stack)
        self.model = model.eval()
        with torch.no_grad():
            self.register_buffer("table", model.item_vectors().detach().clone())

    def state_width(self) -> int:
        """S, the packed state's width per user."""
        return (5 * self.levels + 2) * self.table.shape[1]

    def forward(
        self, events: Tensor, packed: Tensor, item_ids: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        state = unpack_state(events, packed, self.levels)
        x = self.table[item_ids]
        user, state = self.model.push_vectors(state, x, item_ids)
        scores = user @ self.table.T
        scores[:, 0] = float("-inf")
        top_scores, top_items = torch.topk(scores, self.k, dim=1)
        return (*pack_state(state), user, top_scores, top_items)


class StreamingRecommender:
    """The states of ``num_users`` users in one pool; ``push(users, items)`` records one event
    for each listed user (internal ids; a user at most once per call) and returns their
    top-k items by score after it. ``reset(users)`` forgets their histories."""

    def __init__(self, model: ConvRec, num_users: int, k: int = 10) -> None:
        self.module = StreamingModule(model, k)
        like = self.module.table
        self.events = torch.zeros(num_users, dtype=torch.int64, device=like.device)
        self.states = like.new_zeros(num_users, self.module.state_width())

    @torch.no_grad()
    def push(self, users: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        """``users`` (B,) rows of the pool, ``items`` (B,) their new items -> (scores, items),
        each (B, k)."""
        if users.unique().numel() != users.numel():
            raise ValueError("push takes each user at most once per call (events are ordered)")
        events, states, _, scores, top = self.module(self.events[users], self.states[users], items)
        self.events[users], self.states[users] = events, states
        return scores, top

    def reset(self, users: Tensor) -> None:
        self.events[users] = 0
        self.states[users] = 0
