"""``gather_embed``: item rows plus the mean of the item's attribute rows, times the mask.

The reference below is the oracle for the Triton kernels (``triton/gather_embed.py``, and
``triton/embed_conv_pool.py`` which fuses it into level 1), for the CPU path composed of two
``convrec._C`` ops (``gather_embed_extension``), and the fallback. The Triton path is the
custom op ``torch.ops.convrec.gather_embed`` with a fake implementation and autograd, so it
composes with ``torch.compile(fullgraph=True)``; the CPU path's bags have a data-dependent
size (a graph break under ``torch.compile``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from convrec.checks import check_id_range
from convrec.ops.bags_of_rows import bags_of_rows
from convrec.ops.dispatch import EXTENSION_DTYPES, resolve, triton_kernels
from convrec.ops.embedding_rows import embedding_rows
from convrec.ops.item_tables import ItemTables


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


def rows_at(table: Tensor, where: Tensor) -> Tensor:
    """``table[where]`` for a (R, W) ``table`` and integer ``where`` of any shape ->
    (*where.shape, W). On the CPU by ``index_select``, whose backward is one ``index_add_``
    (about 3x faster than the sorting backward of ``table[where]`` at 65k rows of 256, one
    thread); on other devices by ``F.embedding``, whose backward sums in a fixed order where
    ``index_add_`` would use atomics."""
    if table.device.type != "cpu":
        return F.embedding(where, table)
    return table.index_select(0, where.reshape(-1)).view(*where.shape, table.shape[-1])


def gather_embed(
    item_ids: Tensor,
    tables: ItemTables,
    mask: Tensor | None = None,
    backend: str = "reference",
) -> Tensor:
    """``x[b, t] = mask[b, t] * (item[v] + mean_{a in attrs(v)} attr[a])``, v = ids[b, t]

    ``item_ids`` (B, L) integer (any shape works), ``tables`` an ``ItemTables`` (item table
    (N + 1, D) with row 0 the padding item, optional attribute CSR and table). ``mask`` (B, L)
    bool defaults to ``item_ids != 0``. Returns (B, L, D) in the tables' dtype. ``backend``:
    see ``convrec.ops.dispatch`` (fast paths: "triton" on CUDA, "cpp" on the CPU).
    """
    tables.check()
    if mask is None:
        mask = item_ids != 0
    implementation = resolve("gather_embed", backend, tables.item.device)
    if implementation == "reference" or (
        implementation == "cpp" and tables.item.dtype not in EXTENSION_DTYPES["cpu"]
    ):
        return gather_embed_reference(item_ids, tables, mask)
    check_gather_inputs(item_ids, tables, mask)
    if implementation == "cpp":
        return gather_embed_extension(item_ids, tables, mask)
    return torch.ops.convrec.gather_embed(item_ids, *tables, mask)


def gather_embed_reference(item_ids: Tensor, tables: ItemTables, mask: Tensor) -> Tensor:
    """The pure-PyTorch ``gather_embed`` (the oracle); arguments as there, mask required."""
    x = F.embedding(item_ids, tables.item)
    if tables.has_attributes:
        x = x + attribute_bags(item_ids, tables.attr_offsets, tables.attr_ids, tables.attr)
    return x * mask.unsqueeze(-1).to(x.dtype)


def gather_embed_extension(item_ids: Tensor, tables: ItemTables, mask: Tensor) -> Tensor:
    """The "cpp" ``gather_embed`` (CPU): the same sum from two ``convrec._C`` ops whose
    backwards write the tables' gradients without sorting. ``embedding_rows`` picks the item
    rows (its backward zeroes the item table's gradient by ``memset`` and adds the rows in
    order); ``bags_of_rows`` sums the attribute rows of every position's item, divided by
    its bag size (its backward adds the entries into a cache-resident attribute table). The
    reference pools the whole catalogue and gathers, and its backward sorts every position
    and every bag entry (about a fifth of a ConvRec training step on Beauty, one thread)."""
    ids = item_ids.reshape(-1).long()
    x = embedding_rows(tables.item, ids, None, "cpp")
    if tables.has_attributes:
        offsets, attr_ids = tables.attr_offsets, tables.attr_ids.long()
        sums = bags_of_rows(ids, offsets, attr_ids, tables.attr, "cpp")
        sizes = (offsets[ids + 1] - offsets[ids]).clamp(min=1).to(sums.dtype)
        x = x + sums / sizes[:, None]
    return x.view(*item_ids.shape, -1) * mask.unsqueeze(-1).to(x.dtype)


def check_gather_inputs(item_ids: Tensor, tables: ItemTables, mask: Tensor) -> None:
    """Raise naming the problem before a kernel reads memory it does not own (kernels do not
    bounds-check). The CSR contents are trusted: ``ItemEncoder`` checks them once."""
    item_table, attr_offsets, attr_ids, attr_table = tables
    if item_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"item_ids must be int64 or int32, got {item_ids.dtype}")
    if item_table.dim() != 2 or not item_table.is_floating_point():
        raise ValueError(
            f"item_table must be a 2-D float tensor, got {item_table.dtype} "
            f"{tuple(item_table.shape)}"
        )
    if mask.shape != item_ids.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be bool with the ids' shape {tuple(item_ids.shape)}, got {mask.dtype} "
            f"{tuple(mask.shape)}"
        )
    if attr_table is not None:
        if attr_table.dim() != 2 or attr_table.shape[1] != item_table.shape[1]:
            raise ValueError(
                f"attr_table must be (A, {item_table.shape[1]}), got {tuple(attr_table.shape)}"
            )
        if attr_table.dtype != item_table.dtype:
            raise TypeError(f"attr_table is {attr_table.dtype}, item_table {item_table.dtype}")
        if attr_offsets.shape != (item_table.shape[0] + 1,) or attr_offsets.dtype != torch.int64:
            raise ValueError(
                f"attr_offsets must be int64 of shape ({item_table.shape[0] + 1},) (one per item "
                f"row, plus one), got {attr_offsets.dtype} {tuple(attr_offsets.shape)}"
            )
        if attr_ids.dim() != 1 or attr_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"attr_ids must be 1-D integer, got {attr_ids.dtype}")
    check_id_range(item_ids, item_table.shape[0] - 1, "item_ids")


@torch.library.custom_op("convrec::gather_embed", mutates_args=())
def _gather_embed_op(
    item_ids: Tensor,
    item_table: Tensor,
    attr_offsets: Tensor | None,
    attr_ids: Tensor | None,
    attr_table: Tensor | None,
    mask: Tensor,
) -> Tensor:
    return triton_kernels("gather_embed").gather_embed_forward(
        item_ids, item_table, attr_offsets, attr_ids, attr_table, mask
    )


@_gather_embed_op.register_fake
def _(item_ids, item_table, attr_offsets, attr_ids, attr_table, mask):
    return item_table.new_empty(*item_ids.shape, item_table.shape[1])


@torch.library.custom_op("convrec::gather_embed_backward", mutates_args=())
def _gather_embed_backward_op(
    grad: Tensor,
    item_ids: Tensor,
    mask: Tensor,
    attr_offsets: Tensor | None,
    attr_ids: Tensor | None,
    item_rows: int,
    attr_rows: int,
    deterministic: bool,
) -> tuple[Tensor, Tensor]:
    """fp32 gradients of the item table and the attribute table ((0, D) without attributes)."""
    grad_item, grad_attr = triton_kernels("gather_embed").gather_embed_backward(
        grad, item_ids, mask, item_rows, attr_offsets, attr_ids, attr_rows, deterministic
    )
    return grad_item, grad_item.new_zeros(0, grad.shape[-1]) if grad_attr is None else grad_attr


@_gather_embed_backward_op.register_fake
def _(grad, item_ids, mask, attr_offsets, attr_ids, item_rows, attr_rows, deterministic):
    rows = 0 if attr_ids is None else attr_rows
    grad_item = grad.new_empty(item_rows, grad.shape[-1], dtype=torch.float32)
    return grad_item, grad_item.new_empty(rows, grad.shape[-1])


def _setup_context(ctx, inputs, output) -> None:
    item_ids, item_table, attr_offsets, attr_ids, attr_table, mask = inputs
    ctx.save_for_backward(item_ids, attr_offsets, attr_ids, mask)
    ctx.item_table = (item_table.shape[0], item_table.dtype)
    ctx.attr_table = None if attr_table is None else (attr_table.shape[0], attr_table.dtype)


def _backward(ctx, grad: Tensor):
    item_ids, attr_offsets, attr_ids, mask = ctx.saved_tensors
    (item_rows, item_dtype), attr = ctx.item_table, ctx.attr_table
    grad_item, grad_attr = torch.ops.convrec.gather_embed_backward(
        grad,
        item_ids,
        mask,
        attr_offsets,
        attr_ids,
        item_rows,
        0 if attr is None else attr[0],
        torch.are_deterministic_algorithms_enabled(),
    )
    grad_attr = None if attr is None else grad_attr.to(attr[1])
    return None, grad_item.to(item_dtype), None, None, grad_attr, None


_gather_embed_op.register_autograd(_backward, setup_context=_setup_context)
