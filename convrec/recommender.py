"""The interface every sequential recommender here shares: encode, score, recommend.

Keeping ConvRec and the attention baseline behind one interface lets training, evaluation and
benchmarks treat them identically.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from convrec.checks import check_id_range, check_item_ids
from convrec.item_encoder import FaithfulItemEncoder, ItemEncoder, LegacyFaithfulItemEncoder
from convrec.ops.all_items import score_all_items
from convrec.ops.dispatch import set_backend


class SequentialRecommender(nn.Module):
    """Base class: subclasses set ``self.item_encoder`` and ``self.encoder`` and implement
    ``_encode``."""

    item_encoder: ItemEncoder | FaithfulItemEncoder | LegacyFaithfulItemEncoder
    encoder: nn.Module
    check_inputs: bool = False
    # candidates get the target interaction's date (ConvRec(leak_target_date=True)): scoring
    # then needs candidates and target_timestamps
    leaks_target_date: bool = False

    @property
    def num_items(self) -> int:
        return self.item_encoder.num_items

    def _encode(self, item_ids: Tensor, mask: Tensor, timestamps: Tensor | None) -> Tensor:
        raise NotImplementedError

    def set_backend(self, name: str) -> SequentialRecommender:
        """Run every op of the model on backend ``name`` (``convrec.ops.dispatch``) from now on;
        raises ``ValueError``, changing nothing, when a part of the model cannot. Returns self."""
        set_backend(self, name)
        return self

    def user_from_vectors(self, x: Tensor, item_ids: Tensor) -> Tensor:
        """History item vectors (B, L, D), zero at padding, and their ids (B, L) -> user vectors
        (B, D): everything ``encode`` does after the item lookup, which serving runs on a frozen
        table. The ids are there for readouts keyed by item (ConvRec's ``last_item_table``).
        """
        return self.encoder(x, item_ids != 0)

    def _encode_positions(
        self, item_ids: Tensor, mask: Tensor, timestamps: Tensor | None
    ) -> Tensor:
        """(B, L, D): slot t encodes the history up to t. Only causal models can."""
        raise TypeError(
            f"{type(self).__name__} encodes a history into one vector, not one per position: "
            "train it with train_sampling='all-prefixes' or 'random-cut'"
        )

    def _checked_ids(self, item_ids: Tensor, timestamps: Tensor | None) -> Tensor:
        check_item_ids(item_ids, self.num_items)
        item_ids = item_ids.long()
        if self.item_encoder.use_time:
            if timestamps is None:
                raise ValueError("this model uses time context: pass timestamps (B, L)")
            if timestamps.shape != item_ids.shape:
                raise ValueError(
                    f"timestamps have shape {tuple(timestamps.shape)}, item_ids "
                    f"{tuple(item_ids.shape)}"
                )
        elif timestamps is not None:
            raise ValueError("this model was built without time context (use_time=False)")
        return item_ids

    def encode(self, item_ids: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """Left-padded histories (B, L), 0 = padding, newest last -> user vectors (B, D)."""
        item_ids = self._checked_ids(item_ids, timestamps)
        return self._encode(item_ids, item_ids != 0, timestamps)

    def item_vectors(self, item_ids: Tensor | None = None) -> Tensor:
        """Candidate vectors for ids of any shape, or (N + 1, D) for every item when None."""
        if item_ids is None:
            return self.item_encoder.all_items()
        check_id_range(item_ids, self.num_items, "candidates")
        return self.item_encoder.vectors(item_ids.long())

    def forward(
        self,
        item_ids: Tensor,
        candidates: Tensor | None = None,
        timestamps: Tensor | None = None,
        every_position: bool = False,
        target_timestamps: Tensor | None = None,
        slots: Tensor | None = None,
        users_and_items: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``score``, or ``score_positions`` (of ``slots``) with ``every_position``: calling
        the module lets wrappers such as DDP see the forward. ``users_and_items`` (all-item
        scoring only) returns the user vectors and the item table those scores would multiply,
        for a loss that scores them itself (``convrec.ops.all_items_cross_entropy``)."""
        if every_position:
            if candidates is not None:
                raise ValueError("every_position scores all items: candidates must be None")
            return self.score_positions(item_ids, timestamps, slots, users_and_items)
        if slots is not None:
            raise ValueError("slots selects positions to score: pass every_position=True")
        if users_and_items:
            if candidates is not None:
                raise ValueError("users_and_items returns the whole item table: no candidates")
            self._check_target_dates(None, target_timestamps)
            return self.encode(item_ids, timestamps), self.item_vectors()
        return self.score(item_ids, candidates, timestamps, target_timestamps)

    def score_positions(
        self,
        item_ids: Tensor,
        timestamps: Tensor | None = None,
        slots: Tensor | None = None,
        users_and_items: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """(P, N + 1) all-item scores of every real (non-padding) slot, in row-major order, each
        from the history up to that slot: one forward trains every next-item target (causal
        models only; column 0 is -inf). ``slots`` (B, L) bool scores only those real slots
        (the others are context). ``users_and_items``: the (P, D) user vectors and the
        (N + 1, D) item table instead of their scores."""
        item_ids = self._checked_ids(item_ids, timestamps)
        real = item_ids != 0
        scored = real
        if slots is not None:
            if slots.shape != item_ids.shape or slots.dtype != torch.bool:
                raise ValueError(
                    f"slots must be a bool tensor of shape {tuple(item_ids.shape)}, got "
                    f"{slots.dtype} {tuple(slots.shape)}"
                )
            scored = real & slots
        users = self._encode_positions(item_ids, real, timestamps)[scored]
        if users_and_items:
            return users, self.item_vectors()
        return score_all_items(users, self.item_vectors())

    def score(
        self,
        item_ids: Tensor,
        candidates: Tensor | None = None,
        timestamps: Tensor | None = None,
        target_timestamps: Tensor | None = None,
    ) -> Tensor:
        """Dot-product scores: (B, C) for candidate ids (B, C), or (B, N + 1) for all items.

        In the all-items form column j is item j and column 0 (padding) is -inf.
        ``target_timestamps`` (B,): the dates of the interactions being predicted, which only a
        model that ``leaks_target_date`` reads (and requires, with candidates).
        """
        self._check_target_dates(candidates, target_timestamps)
        if candidates is None:
            return score_all_items(self.encode(item_ids, timestamps), self.item_vectors())
        if candidates.dim() != 2 or candidates.shape[0] != item_ids.shape[0]:
            raise ValueError(
                f"candidates must have shape (B, C) with B={item_ids.shape[0]}, "
                f"got {tuple(candidates.shape)}"
            )
        check_id_range(candidates, self.num_items, "candidates")
        user, vectors = self._user_and_candidates(
            item_ids, candidates.long(), timestamps, target_timestamps
        )
        return torch.einsum("bd,bcd->bc", user, vectors)

    def _check_target_dates(
        self, candidates: Tensor | None, target_timestamps: Tensor | None
    ) -> None:
        """Target dates go with candidates, and only to a model that leaks them."""
        if self.leaks_target_date and (candidates is None or target_timestamps is None):
            raise ValueError(
                "this model gives candidates the target's date (leak_target_date=True): pass "
                "candidates (B, C) and target_timestamps (B,)"
            )
        if not self.leaks_target_date and target_timestamps is not None:
            raise ValueError("target_timestamps are read only by leak_target_date=True models")

    def _user_and_candidates(
        self,
        item_ids: Tensor,
        candidates: Tensor,
        timestamps: Tensor | None,
        target_timestamps: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """User vectors (B, D) and candidate vectors (B, C, D) for checked candidate ids."""
        return self.encode(item_ids, timestamps), self.item_encoder.vectors(candidates)

    @torch.no_grad()
    def recommend(
        self,
        item_ids: Tensor,
        k: int = 10,
        exclude: Tensor | None = None,
        timestamps: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Top-``k`` items over the whole catalogue -> (scores, item ids), each (B, k).

        ``exclude``: item ids (B, E) with 0 as filler, or a (B, N + 1) bool mask, never returned.
        """
        if not 1 <= k <= self.num_items:
            raise ValueError(f"k must be in [1, {self.num_items}], got {k}")
        scores = self.score(item_ids, timestamps=timestamps)
        if exclude is not None:
            if exclude.dtype == torch.bool:
                if exclude.shape != scores.shape:
                    raise ValueError(
                        f"exclude mask has shape {tuple(exclude.shape)}, expected "
                        f"{tuple(scores.shape)}"
                    )
                scores = scores.masked_fill(exclude, float("-inf"))
            else:
                if exclude.dim() != 2 or exclude.shape[0] != scores.shape[0]:
                    raise ValueError(
                        f"exclude ids must have shape (B, E), got {tuple(exclude.shape)}"
                    )
                check_id_range(exclude, self.num_items, "exclude")
                scores = scores.scatter(1, exclude.long(), float("-inf"))
        return torch.topk(scores, k, dim=1)
