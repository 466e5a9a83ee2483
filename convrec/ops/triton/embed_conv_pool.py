"""The fused ``embed_conv_pool``: ``gather_embed`` feeding level 1 of the down-scale stack.

It launches the ``conv_pool`` kernels with a table ``RowSource``: every tile of embeddings is
rebuilt in registers from the ids and the tables where the conv needs it, so the (B, L, D)
embeddings never reach memory. At level 1 the long residual is the embedding itself, so the
pooled residual equals the pooled input and is computed once.

Backward: the input gradient needs only the output gradients and the weight, and is added
straight into the fp32 table gradients with atomics; in deterministic mode it is written to a
(B, L, D) fp32 buffer and reduced per table row in a fixed order instead. The weight gradient
rebuilds the embeddings again (recomputed, never saved), tile by tile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .conv_pool import (
    Level,
    ScatterTarget,
    level_backward_input,
    level_backward_weight,
    level_forward,
    table_source,
)
from .gather_embed import scatter_deterministic


def embed_conv_pool_forward(
    item_ids: Tensor,
    item_table: Tensor,
    attr_offsets: Tensor | None,
    attr_ids: Tensor | None,
    attr_table: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor,
    stride: int,
    heads: int,
    mask_aware: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(conv, pooled, counts) of level 1 for (B, L) ids; ``mask`` zeroes positions."""
    item_table = item_table.contiguous()
    attr_table = None if attr_table is None else attr_table.contiguous()
    source = table_source(item_ids, item_table, attr_offsets, attr_ids, attr_table)
    level = Level.of(item_ids.shape[0], item_ids.shape[1], weight, stride, heads)
    conv, pooled, _, counts = level_forward(
        level, source, None, weight, bias, mask, mask_aware, item_table.dtype
    )
    return conv, pooled, counts


def embed_conv_pool_backward(
    g_conv: Tensor,
    g_pool: Tensor,
    item_ids: Tensor,
    item_table: Tensor,
    attr_offsets: Tensor | None,
    attr_ids: Tensor | None,
    attr_table: Tensor | None,
    weight: Tensor,
    mask: Tensor,
    counts: Tensor,
    stride: int,
    heads: int,
    mask_aware: bool,
    deterministic: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Dense gradients of the item table, attribute table (or None), conv weight and bias."""
    item_table = item_table.contiguous()
    attr_table = None if attr_table is None else attr_table.contiguous()
    level = Level.of(item_ids.shape[0], item_ids.shape[1], weight, stride, heads)
    grad_item = g_conv.new_zeros(item_table.shape, dtype=torch.float32)
    grad_attr = None if attr_table is None else grad_item.new_zeros(attr_table.shape)
    target = ScatterTarget(item_ids, grad_item, attr_offsets, attr_ids, grad_attr)
    args = (level, g_conv, g_pool, None, weight, mask, counts, mask_aware)
    if deterministic:
        grad_x, _ = level_backward_input(*args, torch.float32)
        scatter_deterministic(grad_x, item_ids, mask, grad_item, attr_offsets, attr_ids, grad_attr)
    else:
        level_backward_input(*args, torch.float32, scatter=target)
    source = table_source(item_ids, item_table, attr_offsets, attr_ids, attr_table)
    grad_w = level_backward_weight(level, g_conv, source, weight, mask)
    grad_b = g_conv.sum((0, 1), dtype=torch.float32).to(weight.dtype)
    grad_attr = None if grad_attr is None else grad_attr.to(attr_table.dtype)
    return grad_item.to(item_table.dtype), grad_attr, grad_w, grad_b
