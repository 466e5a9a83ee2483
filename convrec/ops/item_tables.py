"""``ItemTables``: the tables an item gather reads, as one value, and the item -> attributes CSR.

An item's vector is its row of the item table plus the mean of its attribute rows; the
attributes of item ``i`` are ``attr_ids[attr_offsets[i]:attr_offsets[i + 1]]`` (CSR). The four
tensors travel together through the item encoder, the encoder's fused path and the ops, so they
are one value here; only the ``torch.library`` boundary takes them as flat arguments
(``*tables`` unpacks them in that order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class ItemTables(NamedTuple):
    """``item`` (N + 1, D) with row 0 the padding item; ``attr_offsets`` (N + 2,) int64 CSR
    offsets, ``attr_ids`` (nnz,) integer indices into ``attr`` (A, D): all three or none."""

    item: Tensor
    attr_offsets: Tensor | None = None
    attr_ids: Tensor | None = None
    attr: Tensor | None = None

    @property
    def has_attributes(self) -> bool:
        return self.attr is not None

    def check(self) -> ItemTables:
        """Raise ``ValueError`` unless the attribute parts are all given or all None."""
        given = [t is not None for t in (self.attr_offsets, self.attr_ids, self.attr)]
        if any(given) and not all(given):
            raise ValueError("attr_offsets, attr_ids and attr must be given together")
        return self


def csr_from_lists(attributes: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """``attributes[i]`` = attribute ids of item i (row 0 = padding) -> (offsets, ids) CSR."""
    counts = torch.tensor([len(a) for a in attributes], dtype=torch.int64)
    offsets = torch.zeros(len(attributes) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    ids = torch.tensor([int(a) for row in attributes for a in row], dtype=torch.int64)
    return offsets, ids


def check_csr(offsets: Tensor, ids: Tensor, num_rows: int, num_attributes: int) -> None:
    """Raise ``ValueError`` naming the first inconsistency of an item -> attributes CSR index."""
    if offsets.dim() != 1 or offsets.dtype != torch.int64:
        raise ValueError(
            f"attribute offsets must be 1-D int64, got {offsets.dtype} {tuple(offsets.shape)}"
        )
    if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"attribute ids must be 1-D integer, got {ids.dtype} {tuple(ids.shape)}")
    if offsets.numel() != num_rows + 1:
        raise ValueError(
            f"attribute offsets have {offsets.numel()} entries, expected num_items + 2 = "
            f"{num_rows + 1} (row 0 is the padding item)"
        )
    if int(offsets[0]) != 0 or int(offsets[-1]) != ids.numel():
        raise ValueError(
            f"attribute offsets must start at 0 and end at len(ids)={ids.numel()}, "
            f"got {int(offsets[0])}..{int(offsets[-1])}"
        )
    step = offsets[1:] - offsets[:-1]
    if bool((step < 0).any()):
        row = int((step < 0).nonzero()[0])
        raise ValueError(f"attribute offsets decrease at item {row}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_attributes):
        where = int(((ids < 0) | (ids >= num_attributes)).nonzero()[0])
        item = int(torch.searchsorted(offsets, torch.tensor(where), right=True)) - 1
        raise ValueError(
            f"item {item} has attribute id {int(ids[where])}, outside [0, {num_attributes})"
        )
