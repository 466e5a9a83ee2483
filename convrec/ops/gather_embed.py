"""``gather_embed``: item rows plus the mean of the item's attribute rows, times the mask.

The reference below is the oracle for the fused Triton kernels (``kernels/gather_embed.py``,
``kernels/embed_conv_pool.py``) and the CPU fallback.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def attribute_bags(
    rows: Tensor, attr_offsets: Tensor, attr_ids: Tensor, attr_table: Tensor, mode: str = "mean"
) -> Tensor:
    """Mean (or sum) of the attribute rows of each item id in ``rows`` (any shape) -> (*, D).

    CSR layout: the attributes of item ``i`` are ``attr_ids[attr_offsets[i]:attr_offsets[i+1]]``;
    repeated ids count as often as they appear (a weight, as in LastFM's tag lists) and an item
    without attributes gets a zero vector. The reference pools every item once and gathers,
    which keeps shapes static (``torch.compile(fullgraph=True)``) at O(nnz * D) per call.
    """
    per_item = F.embedding_bag(
        attr_ids, attr_table, attr_offsets, mode=mode, include_last_offset=True
    )
    return per_item[rows]


def gather_embed(
    item_ids: Tensor,
    item_table: Tensor,
    attr_offsets: Tensor | None = None,
    attr_ids: Tensor | None = None,
    attr_table: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """``x[b, t] = mask[b, t] * (item_table[v] + mean_{a in attrs(v)} attr_table[a])``, v=ids[b,t]

    Shapes: ``item_ids`` (B, L) integer, ``item_table`` (N + 1, D) with row 0 the padding item;
    ``attr_offsets`` (N + 2,) int64 CSR offsets and ``attr_ids`` (nnz,) integer indices into
    ``attr_table`` (A, D); the three attribute arguments are all given or all None. ``mask``
    (B, L) bool defaults to ``item_ids != 0``. Returns (B, L, D) in the tables' dtype.
    """
    if (attr_offsets is None) != (attr_ids is None) or (attr_ids is None) != (attr_table is None):
        raise ValueError("attr_offsets, attr_ids and attr_table must be given together")
    if mask is None:
        mask = item_ids != 0
    x = F.embedding(item_ids, item_table)
    if attr_table is not None:
        x = x + attribute_bags(item_ids, attr_offsets, attr_ids, attr_table)
    return x * mask.unsqueeze(-1).to(x.dtype)
