"""Serving a streaming ConvRec one event at a time: each user's state in, the new state out.

``ConvRec(streaming=True)`` anchors its windows at a user's first event, so a new event changes
only the open window of each level: ``StreamingModule`` updates a batch of users by one event
each at O(levels) cost, whatever their history lengths, and scores the whole catalogue from a
frozen item table. Its inputs and outputs are plain tensors (``ops.stream_downscale.pack_state``),
so it exports with ``torch.export``. ``StreamingRecommender`` keeps the states of a population
of users in one pooled tensor indexed by user and serves pushes from it, in internal or
original ids (``from_checkpoint`` loads a ``convrec train --streaming`` checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from convrec.model import ConvRec
from convrec.ops.stream_downscale import kept_rows, pack_state, unpack_state
from convrec.serving.checkpoint import load_model


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
        self.k, self.levels = k, len(model.encoder.levels)
        strides = [stride for _, stride in model.encoder.levels]
        self.kept = kept_rows(strides, model.encoder.newest_last)
        self.model = model.eval()
        with torch.no_grad():
            self.register_buffer("table", model.item_vectors().detach().clone())

    def state_width(self) -> int:
        """S, the packed state's width per user."""
        return (5 * self.levels + 2 + sum(self.kept)) * self.table.shape[1]

    def forward(
        self, events: Tensor, packed: Tensor, item_ids: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        state = unpack_state(events, packed, self.levels, self.kept)
        x = self.table[item_ids]
        user, state = self.model.push_vectors(state, x, item_ids)
        scores = user @ self.table.T
        scores[:, 0] = float("-inf")
        top_scores, top_items = torch.topk(scores, self.k, dim=1)
        return (*pack_state(state), user, top_scores, top_items)


class StreamingRecommender:
    """The states of up to ``num_users`` users in one pooled tensor, served one event at a time.

    ``push(users, items)`` takes pool rows and internal item ids (tensors); ``observe(events)``
    takes (user key, original item id) pairs, gives each new user key the next free row, and
    returns each user's top-k (original item id, score) after the event. ``reset`` forgets
    users. A user appears at most once per call: its events are ordered.
    """

    def __init__(
        self, model: ConvRec, num_users: int, k: int = 10, item_ids: list[str] | None = None
    ) -> None:
        self.module = StreamingModule(model, k)
        like = self.module.table
        self.events = torch.zeros(num_users, dtype=torch.int64, device=like.device)
        self.states = like.new_zeros(num_users, self.module.state_width())
        self.item_ids = item_ids or [str(i) for i in range(model.num_items + 1)]
        self._items = {orig: i for i, orig in enumerate(self.item_ids) if i > 0}
        self._rows: dict[str, int] = {}

    @classmethod
    def from_checkpoint(cls, path: str, num_users: int, k: int = 10) -> StreamingRecommender:
        """Serve a checkpoint of ``convrec train --streaming`` in its original item ids."""
        model, meta = load_model(path)
        if not isinstance(model, ConvRec) or not model.encoder.streaming:
            raise ValueError(f"{path} is not a streaming ConvRec (train it with --streaming)")
        return cls(model, num_users, k, meta["item_ids"])

    @torch.no_grad()
    def push(self, users: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        """``users`` (B,) rows of the pool, ``items`` (B,) their new items -> (scores, items),
        each (B, k)."""
        if users.unique().numel() != users.numel():
            raise ValueError("push takes each user at most once per call (events are ordered)")
        events, states, _, scores, top = self.module(self.events[users], self.states[users], items)
        self.events[users], self.states[users] = events, states
        return scores, top

    def observe(self, events: Sequence[tuple[str, str]]) -> dict[str, list[tuple[str, float]]]:
        """(user key, original item id) pairs -> each user's top-k (item id, score) after it."""
        unknown = [item for _, item in events if str(item) not in self._items]
        if unknown:
            raise ValueError(f"unknown item ids: {unknown[:5]}")
        keys = [str(user) for user, _ in events]
        for key in keys:
            if key not in self._rows:
                if len(self._rows) == len(self.events):
                    raise ValueError(f"the pool holds {len(self.events)} users; it is full")
                self._rows[key] = len(self._rows)
        rows = torch.tensor([self._rows[key] for key in keys], device=self.events.device)
        items = torch.tensor([self._items[str(item)] for _, item in events], device=rows.device)
        scores, top = self.push(rows, items)
        return {
            key: [(self.item_ids[int(i)], float(v)) for i, v in zip(t, s, strict=True)]
            for key, s, t in zip(keys, scores, top, strict=True)
        }

    def reset(self, users: Tensor) -> None:
        self.events[users] = 0
        self.states[users] = 0
