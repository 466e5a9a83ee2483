"""ConvRec's readouts: terms added to the user vector after the level stack (not in the paper).

The levels average the history by position, so the newest item, which predicts the next one
best, is diluted as histories grow, and nothing picks items by content. Each readout adds one
term to the user vector; each starts at zero, so a model with readouts starts as the model
without them. ``READOUTS`` is the registry: a name, what the readout reads (``NEWEST``: the
newest history slot, vector and id; ``HISTORY``: every history vector) and how to build it.
``ConvRec(readouts=(...))`` and ``convrec train --readout NAME`` take the names; the terms are
added in the registry's order, whatever order they are given in, because ``attention`` queries
with the user vector the others have already changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

NEWEST = "newest item"
HISTORY = "whole history"

# Added to the attention scores of padding slots: exp() of it underflows to 0 in every float
# dtype. An all-padding history (zero vectors) then averages zeros, where -inf would give NaN.
_PAD_SCORE = -1.0e4


class Readout(nn.Module):
    """A term added to the user vector: ``forward(user, x, item_ids)`` -> (B, D).

    ``user`` (B, D) is the user vector so far, ``x`` (B, L, D) the history item vectors (zero at
    padding) and ``item_ids`` (B, L) their ids. A ``NEWEST`` readout may be given the newest
    slot alone (L = 1).
    """


class LastItemSkip(Readout):
    """``g * v_last``: the newest item's vector scaled by a learned per-channel gate."""

    def __init__(self, d_model: int, num_items: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(d_model))

    def forward(self, user: Tensor, x: Tensor, item_ids: Tensor) -> Tensor:
        return self.gate * x[:, -1]


class LastItemTransition(Readout):
    """``W v_last`` with a learned (D, D) ``W``: the gate can only favour items like the newest
    one, ``W`` also learns which items follow it (FPMC's item-to-item transition)."""

    def __init__(self, d_model: int, num_items: int) -> None:
        super().__init__()
        self.map = nn.Linear(d_model, d_model, bias=False)
        nn.init.zeros_(self.map.weight)

    def forward(self, user: Tensor, x: Tensor, item_ids: Tensor) -> Tensor:
        return self.map(x[:, -1])


class LastItemMLP(Readout):
    """``MLP(v_last)`` (D -> 4D -> D, GELU): a non-linear transition, like the feed-forward
    block SASRec applies to each item."""

    def __init__(self, d_model: int, num_items: int) -> None:
        super().__init__()
        out = nn.Linear(4 * d_model, d_model)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), out)

    def forward(self, user: Tensor, x: Tensor, item_ids: Tensor) -> Tensor:
        return self.mlp(x[:, -1])


class LastItemTable(Readout):
    """``T[last item id]``: a learned row per item id, free to remember what follows each single
    item (FPMC's factorised transition)."""

    def __init__(self, d_model: int, num_items: int) -> None:
        super().__init__()
        self.table = nn.Embedding(num_items + 1, d_model, padding_idx=0)
        nn.init.zeros_(self.table.weight)

    def forward(self, user: Tensor, x: Tensor, item_ids: Tensor) -> Tensor:
        return self.table(item_ids[:, -1])


class AttentionReadout(Readout):
    """``out(softmax(q(u) . x / sqrt(D)) @ x)`` over the real slots of the history: one query
    per user picks items by content, at cost linear in the history length like the levels."""

    def __init__(self, d_model: int, num_items: int) -> None:
        super().__init__()
        self.query = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model, bias=False)  # an empty history adds nothing
        nn.init.zeros_(self.out.weight)

    def forward(self, user: Tensor, x: Tensor, item_ids: Tensor) -> Tensor:
        scores = torch.einsum("bd,bld->bl", self.query(user), x) / math.sqrt(x.shape[-1])
        weights = scores.masked_fill(item_ids == 0, _PAD_SCORE).softmax(-1)
        return self.out(torch.einsum("bl,bld->bd", weights, x))


@dataclass(frozen=True)
class ReadoutSpec:
    """A registered readout: what it adds, what it reads, and its constructor
    ``build(d_model, num_items)``."""

    adds: str
    reads: str
    build: Callable[[int, int], Readout]


READOUTS: dict[str, ReadoutSpec] = {
    "last_item_skip": ReadoutSpec("the gated newest item's vector", NEWEST, LastItemSkip),
    "last_item_transition": ReadoutSpec(
        "a learned (D, D) map of the newest item's vector", NEWEST, LastItemTransition
    ),
    "last_item_mlp": ReadoutSpec(
        "an MLP (D -> 4D -> D) of the newest item's vector", NEWEST, LastItemMLP
    ),
    "last_item_table": ReadoutSpec("a learned row per newest item id", NEWEST, LastItemTable),
    "attention": ReadoutSpec(
        "one attention query per user over its history", HISTORY, AttentionReadout
    ),
}


def readout_names(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` checked, without repeats, in the registry's order (the order terms are added)."""
    names = list(names)
    unknown = [n for n in names if n not in READOUTS]
    if unknown:
        raise ValueError(f"unknown readout {unknown[0]!r}; choose from {', '.join(READOUTS)}")
    return tuple(n for n in READOUTS if n in names)


# Before the registry, each readout was a boolean setting (model keyword, TrainConfig key, CLI
# flag) and a model attribute; checkpoints and config files of that time still load through
# these maps (``convrec.registry``, ``TrainConfig.from_dict``).
LEGACY_FLAGS = {
    "last_item_skip": "last_item_skip",
    "last_item_transition": "last_item_transition",
    "last_item_mlp": "last_item_mlp",
    "last_item_table": "last_item_table",
    "attention_readout": "attention",
}
LEGACY_STATE_KEYS = {  # old state_dict prefix -> new one
    "last_item_gate": "readouts.last_item_skip.gate",
    "last_item_transition.": "readouts.last_item_transition.map.",
    "last_item_mlp.": "readouts.last_item_mlp.mlp.",
    "last_item_table.": "readouts.last_item_table.table.",
    "attention_readout.": "readouts.attention.",
}


def upgrade_flags(values: dict) -> dict:
    """``values`` (model keywords or settings) with the legacy readout booleans folded into
    ``readouts``; values without them come back unchanged."""
    legacy = [key for key in LEGACY_FLAGS if key in values]
    if not legacy:
        return values
    values = dict(values)
    chosen = [LEGACY_FLAGS[key] for key in legacy if values.pop(key)]
    values["readouts"] = list(readout_names([*values.get("readouts", ()), *chosen]))
    return values


def upgrade_state_dict(state: dict, prefix: str = "") -> None:
    """Rename, in place, the readout entries of an earlier version's ConvRec ``state_dict``
    (keys under ``prefix``); a current one is left as it is."""
    for key in list(state):
        for old, new in LEGACY_STATE_KEYS.items():
            if key.startswith(prefix + old):
                state[prefix + new + key[len(prefix + old) :]] = state.pop(key)
                break
