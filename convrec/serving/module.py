"""``ServingModule``: the inference graph that exports run, (B, L) ids -> user vectors, top-k.

Item vectors are computed once and frozen into a table, so the graph is a lookup, the model's
``user_from_vectors`` (its sequence encoder and readouts) and one matmul; histories
are left-padded or cut to the model's ``max_len`` inside the graph (pad by ``max_len`` then
keep the last ``max_len``), which keeps every shape after the input static while batch size
and history length stay dynamic.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convrec.item_encoder import FaithfulItemEncoder
from convrec.recommender import SequentialRecommender


class ServingModule(nn.Module):
    """Frozen inference form of a trained model (no time context)."""

    def __init__(
        self, model: SequentialRecommender, max_len: int, k: int, portable: bool = False
    ) -> None:
        """``portable`` runs the encoder on the PyTorch reference (no custom ops in the graph),
        which exports need; otherwise it keeps the model's backend (the C++ kernel, say)."""
        super().__init__()
        if model.item_encoder.use_time:
            raise ValueError("serving exports do not support time-context models yet")
        if isinstance(model.item_encoder, FaithfulItemEncoder):
            raise ValueError(
                "serving does not support faithful=True models: their history vectors carry "
                "time-difference channels, so one frozen item table cannot serve them"
            )
        if not 1 <= k <= model.num_items:
            raise ValueError(f"k must be in [1, {model.num_items}], got {k}")
        self.max_len, self.k = max_len, k
        with torch.no_grad():
            self.register_buffer("table", model.item_vectors().detach().clone())
        # a copy of the model without its item encoder: the frozen table replaces it
        self.model = copy.deepcopy(model, memo={id(model.item_encoder): None}).eval()
        self.model.requires_grad_(False)
        if portable:
            self.model.set_backend("reference")

    def forward(self, item_ids: Tensor, exclude: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``item_ids`` (B, L) left-padded history, ``exclude`` (B, E) ids never returned
        (0 = filler) -> user vectors (B, D), top-k scores (B, k) and item ids (B, k)."""
        ids = F.pad(item_ids, (self.max_len, 0))[:, -self.max_len :]
        mask = ids != 0
        x = self.table[ids] * mask.unsqueeze(-1).to(self.table.dtype)
        user = self.model.user_from_vectors(x, ids)
        scores = user @ self.table.T
        scores = scores.scatter(1, exclude, float("-inf"))
        scores[:, 0] = float("-inf")
        top_scores, top_items = torch.topk(scores, self.k, dim=1)
        return user, top_scores, top_items
