"""``embed_conv_pool``: ``gather_embed`` fused into the first ``conv_pool`` level.

Reads item ids and the tables, returns level 1's conv output and pools without the (B, L, D)
embeddings ever reaching memory (``triton/embed_conv_pool.py``). At level 1 the long residual
is the embedding itself, so the pooled residual is the pooled input. The reference below (the
oracle and CPU fallback) is literally ``gather_embed`` followed by ``conv_pool``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from convrec.ops.conv_pool import ConvPoolOutput, check_conv_weight, conv_pool_reference
from convrec.ops.dispatch import kernel_size_problem, resolve, triton_kernels
from convrec.ops.gather_embed import check_gather_inputs, gather_embed_reference
from convrec.ops.item_tables import ItemTables
from convrec.schedule import out_length


def embed_conv_pool(
    item_ids: Tensor,
    tables: ItemTables,
    weight: Tensor,
    bias: Tensor | None,
    stride: int,
    heads: int,
    mask: Tensor | None = None,
    mask_aware: bool = False,
    backend: str = "reference",
) -> ConvPoolOutput:
    """Level 1 of the stack straight from (B, L) ids: ``conv_pool(x, x, ...)`` with
    ``x = gather_embed(ids, tables, mask)``.

    Arguments as in ``gather_embed`` (``tables``, ``mask`` defaulting to ``ids != 0``) and
    ``conv_pool`` (conv ``weight`` (D, D // heads, k), ``bias``, ``stride``, ``heads``);
    ``mask_aware`` averages over real positions only and returns the window mask. The returned
    ``residual`` is the same tensor as ``pooled``.
    """
    tables.check()
    if mask is None:
        mask = item_ids != 0
    problem = kernel_size_problem(weight.shape[-1])
    if resolve("embed_conv_pool", backend, tables.item.device, problem) == "triton":
        if item_ids.dim() != 2 or item_ids.numel() == 0:
            raise ValueError(f"item_ids must be a non-empty (B, L) tensor, got {item_ids.shape}")
        check_gather_inputs(item_ids, tables, mask)
        check_conv_weight(weight, bias, stride, heads, tables.item.shape[1], tables.item.dtype)
        conv, pooled, counts = torch.ops.convrec.embed_conv_pool(
            item_ids, *tables, weight, bias, mask, stride, heads, mask_aware
        )
        return ConvPoolOutput(conv, pooled, pooled, counts > 0 if mask_aware else None)
    args = (weight, bias, stride, heads, mask, mask_aware)
    return embed_conv_pool_reference(item_ids, tables, *args)


def embed_conv_pool_reference(
    item_ids: Tensor,
    tables: ItemTables,
    weight: Tensor,
    bias: Tensor | None,
    stride: int,
    heads: int,
    mask: Tensor,
    mask_aware: bool,
) -> ConvPoolOutput:
    """The pure-PyTorch composition (the oracle); ``mask`` required."""
    x = gather_embed_reference(item_ids, tables, mask)
    return conv_pool_reference(x, x, weight, bias, stride, heads, mask if mask_aware else None)


@torch.library.custom_op("convrec::embed_conv_pool", mutates_args=())
def _embed_conv_pool_op(
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
    """(conv, pooled, int32 count of real positions per window) of level 1."""
    return triton_kernels("embed_conv_pool").embed_conv_pool_forward(
        item_ids, item_table, attr_offsets, attr_ids, attr_table, weight, bias, mask, stride,
        heads, mask_aware,
    )  # fmt: skip


@_embed_conv_pool_op.register_fake
def _(item_ids, item_table, attr_offsets, attr_ids, attr_table, weight, bias, mask, stride, heads,
      mask_aware):  # fmt: skip
    batch, length = item_ids.shape
    windows = out_length(length, weight.shape[-1], stride)
    conv = item_table.new_empty(batch, windows, item_table.shape[1])
    return conv, torch.empty_like(conv), item_ids.new_empty(batch, windows, dtype=torch.int32)


@torch.library.custom_op("convrec::embed_conv_pool_backward", mutates_args=())
def _embed_conv_pool_backward_op(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dense gradients of the item table, attribute table ((0, D) without one), weight, bias."""
    kernels = triton_kernels("embed_conv_pool")
    grad_item, grad_attr, grad_w, grad_b = kernels.embed_conv_pool_backward(
        g_conv, g_pool, item_ids, item_table, attr_offsets, attr_ids, attr_table, weight, mask,
        counts, stride, heads, mask_aware, deterministic,
    )  # fmt: skip
    if grad_attr is None:
        grad_attr = grad_item.new_zeros(0, grad_item.shape[1])
    return grad_item, grad_attr, grad_w, grad_b


@_embed_conv_pool_backward_op.register_fake
def _(g_conv, g_pool, item_ids, item_table, attr_offsets, attr_ids, attr_table, weight, mask,
      counts, stride, heads, mask_aware, deterministic):  # fmt: skip
    attr_rows = 0 if attr_table is None else attr_table.shape[0]
    grad_attr = item_table.new_empty(attr_rows, item_table.shape[1])
    grad_b = weight.new_empty(weight.shape[0])
    return torch.empty_like(item_table), grad_attr, torch.empty_like(weight), grad_b


def _setup_context(ctx, inputs, output) -> None:
    ids, item_table, offsets, attr_ids, attr_table, weight, bias, mask, *rest = inputs
    ctx.save_for_backward(ids, item_table, offsets, attr_ids, attr_table, weight, mask, output[2])
    ctx.geometry = tuple(rest)  # stride, heads, mask_aware
    ctx.has_attr, ctx.has_bias = attr_table is not None, bias is not None


def _backward(ctx, g_conv: Tensor, g_pool: Tensor, _counts: Tensor):
    ids, item_table, offsets, attr_ids, attr_table, weight, mask, counts = ctx.saved_tensors
    grad_item, grad_attr, grad_w, grad_b = torch.ops.convrec.embed_conv_pool_backward(
        g_conv, g_pool, ids, item_table, offsets, attr_ids, attr_table, weight, mask, counts,
        *ctx.geometry, torch.are_deterministic_algorithms_enabled(),
    )  # fmt: skip
    return (
        None,
        grad_item,
        None,
        None,
        grad_attr if ctx.has_attr else None,
        grad_w,
        grad_b if ctx.has_bias else None,
        None,
        None,
        None,
        None,
    )


_embed_conv_pool_op.register_autograd(_backward, setup_context=_setup_context)
