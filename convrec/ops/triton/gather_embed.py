"""Triton kernels of ``gather_embed``: item row plus mean attribute row per position, and the
scatter of gradients back into both tables.

``gather_rows`` and ``scatter_rows`` work on one register tile and are shared with the conv
kernels, so the fused ``embed_conv_pool`` rebuilds embeddings in registers and never stores them.
Gradients accumulate in fp32 buffers: by atomics (fast, order-dependent) or, in deterministic
mode, by sorting positions per table row and summing each row's segment in a fixed order.
All offsets are int64: ids, CSR offsets and row strides may exceed 2^31 in product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import gather_blocks


@triton.jit
def gather_rows(
    ids,
    ok,
    cols,
    cols_ok,
    item_ptr,
    item_stride,
    off_ptr,
    attr_ids_ptr,
    attr_ptr,
    attr_stride,
    HAS_ATTR: tl.constexpr,
):
    """(rows, cols) fp32 tile of ``item[ids] + mean(attr[attrs(ids)])``; rows outside ``ok`` are 0.

    ``ids`` are int64; ``ok`` masks rows (padding, masked positions, out of range).
    """
    both = ok[:, None] & cols_ok[None, :]
    x = tl.load(item_ptr + ids[:, None] * item_stride + cols[None, :], mask=both, other=0.0)
    x = x.to(tl.float32)
    if HAS_ATTR:
        start = tl.load(off_ptr + ids, mask=ok, other=0)
        count = tl.load(off_ptr + ids + 1, mask=ok, other=0) - start
        total = tl.zeros_like(x)
        for j in range(0, tl.max(count, 0)):
            has = ok & (j < count)
            attr = tl.load(attr_ids_ptr + start + j, mask=has, other=0).to(tl.int64)
            rows = attr_ptr + attr[:, None] * attr_stride + cols[None, :]
            total += tl.load(rows, mask=has[:, None] & cols_ok[None, :], other=0.0).to(tl.float32)
        x += total / tl.maximum(count, 1).to(tl.float32)[:, None]
    return x


@triton.jit
def scatter_rows(
    grad,
    ids,
    ok,
    cols,
    cols_ok,
    grad_item_ptr,
    width,
    off_ptr,
    attr_ids_ptr,
    grad_attr_ptr,
    HAS_ATTR: tl.constexpr,
):
    """Atomically add the fp32 tile ``grad`` into the item rows ``ids`` and, divided by the
    attribute count, into each attribute row (the adjoint of ``gather_rows``)."""
    both = ok[:, None] & cols_ok[None, :]
    item_rows = grad_item_ptr + ids[:, None] * width + cols[None, :]
    tl.atomic_add(item_rows, grad, mask=both, sem="relaxed")
    if HAS_ATTR:
        start = tl.load(off_ptr + ids, mask=ok, other=0)
        count = tl.load(off_ptr + ids + 1, mask=ok, other=0) - start
        share = grad / tl.maximum(count, 1).to(tl.float32)[:, None]
        for j in range(0, tl.max(count, 0)):
            has = ok & (j < count)
            attr = tl.load(attr_ids_ptr + start + j, mask=has, other=0).to(tl.int64)
            rows = grad_attr_ptr + attr[:, None] * width + cols[None, :]
            tl.atomic_add(rows, share, mask=has[:, None] & cols_ok[None, :], sem="relaxed")


@triton.jit
def _gather_embed_fwd(
    ids_ptr,
    keep_ptr,
    out_ptr,
    item_ptr,
    item_stride,
    off_ptr,
    attr_ids_ptr,
    attr_ptr,
    attr_stride,
    n,
    width,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_ATTR: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_range, cols_ok = rows < n, cols < width
    ok = in_range & (tl.load(keep_ptr + rows, mask=in_range, other=0) != 0)
    ids = tl.load(ids_ptr + rows, mask=ok, other=0).to(tl.int64)
    x = gather_rows(
        ids, ok, cols, cols_ok, item_ptr, item_stride, off_ptr, attr_ids_ptr, attr_ptr,
        attr_stride, HAS_ATTR,
    )  # fmt: skip
    out = out_ptr + rows[:, None] * width + cols[None, :]
    tl.store(out, x.to(out_ptr.dtype.element_ty), mask=in_range[:, None] & cols_ok[None, :])


@triton.jit
def _gather_embed_bwd(
    grad_ptr,
    grad_row_stride,
    grad_col_stride,
    ids_ptr,
    keep_ptr,
    grad_item_ptr,
    off_ptr,
    attr_ids_ptr,
    grad_attr_ptr,
    n,
    width,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_ATTR: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_range, cols_ok = rows < n, cols < width
    ok = in_range & (tl.load(keep_ptr + rows, mask=in_range, other=0) != 0)
    ids = tl.load(ids_ptr + rows, mask=ok, other=0).to(tl.int64)
    src = grad_ptr + rows[:, None] * grad_row_stride + cols[None, :] * grad_col_stride
    grad = tl.load(src, mask=ok[:, None] & cols_ok[None, :], other=0.0).to(tl.float32)
    scatter_rows(
        grad, ids, ok, cols, cols_ok, grad_item_ptr, width, off_ptr, attr_ids_ptr, grad_attr_ptr,
        HAS_ATTR,
    )  # fmt: skip


@triton.jit
def _segment_sum(
    src_ptr,
    src_row_stride,
    src_col_stride,
    rows_ptr,
    scale_ptr,
    seg_ptr,
    dest_ptr,
    out_ptr,
    n_segments,
    width,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    """``out[dest[s]] = sum_{e in seg[s]:seg[s+1]} scale[e] * src[rows[e]]``, in order of e.

    Each destination row belongs to one segment, so no two programs write the same row.
    """
    segs = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    seg_ok, cols_ok = segs < n_segments, cols < width
    start = tl.load(seg_ptr + segs, mask=seg_ok, other=0)
    length = tl.load(seg_ptr + segs + 1, mask=seg_ok, other=0) - start
    acc = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
    for e in range(0, tl.max(length, 0)):
        has = seg_ok & (e < length)
        row = tl.load(rows_ptr + start + e, mask=has, other=0).to(tl.int64)
        src = src_ptr + row[:, None] * src_row_stride + cols[None, :] * src_col_stride
        value = tl.load(src, mask=has[:, None] & cols_ok[None, :], other=0.0).to(tl.float32)
        if HAS_SCALE:
            value *= tl.load(scale_ptr + start + e, mask=has, other=0.0)[:, None]
        acc += value
    dest = tl.load(dest_ptr + segs, mask=seg_ok, other=0).to(tl.int64)
    tl.store(out_ptr + dest[:, None] * width + cols[None, :], acc, mask=seg_ok[:, None] & cols_ok)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1).contiguous()


def attribute_args(
    attr_offsets: Tensor | None, attr_ids: Tensor | None, attr_table: Tensor | None, dummy: Tensor
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Kernel arguments (offsets, ids, table, row stride) of the CSR index; dummies when absent."""
    if attr_table is None:
        return dummy, dummy, dummy, 0
    return attr_offsets.contiguous(), attr_ids.contiguous(), attr_table, attr_table.stride(0)


def gather_embed_forward(
    item_ids: Tensor,
    item_table: Tensor,
    attr_offsets: Tensor | None,
    attr_ids: Tensor | None,
    attr_table: Tensor | None,
    mask: Tensor,
) -> Tensor:
    """``mask * (item_table[ids] + mean attr rows)``: ids of any shape -> (*ids.shape, D)."""
    item_table = item_table.contiguous()
    attr_table = None if attr_table is None else attr_table.contiguous()
    ids, keep = _flat(item_ids), _flat(mask).view(torch.uint8)
    n, width = ids.numel(), item_table.shape[1]
    out = item_table.new_empty(n, width)
    offsets, a_ids, a_table, a_stride = attribute_args(attr_offsets, attr_ids, attr_table, out)
    block_r, block_c = gather_blocks(n, width)
    grid = (triton.cdiv(n, block_r), triton.cdiv(width, block_c))
    if n:
        _gather_embed_fwd[grid](
            ids, keep, out, item_table, item_table.stride(0), offsets, a_ids, a_table, a_stride,
            n, width, BLOCK_R=block_r, BLOCK_C=block_c, HAS_ATTR=attr_table is not None,
        )  # fmt: skip
    return out.view(*item_ids.shape, width)


def scatter_atomic(
    grad: Tensor,
    item_ids: Tensor,
    mask: Tensor,
    grad_item: Tensor,
    attr_offsets: Tensor | None,
    attr_ids: Tensor | None,
    grad_attr: Tensor | None,
) -> None:
    """Add ``grad`` (*ids.shape, D) at unmasked positions into the fp32 table gradients."""
    ids, keep = _flat(item_ids), _flat(mask).view(torch.uint8)
    n, width = ids.numel(), grad_item.shape[1]
    grad = grad.reshape(n, width)
    offsets, a_ids, a_grad, _ = attribute_args(attr_offsets, attr_ids, grad_attr, grad_item)
    block_r, block_c = gather_blocks(n, width)
    grid = (triton.cdiv(n, block_r), triton.cdiv(width, block_c))
    if n:
        _gather_embed_bwd[grid](
            grad, grad.stride(0), grad.stride(1), ids, keep, grad_item, offsets, a_ids, a_grad,
            n, width, BLOCK_R=block_r, BLOCK_C=block_c, HAS_ATTR=grad_attr is not None,
        )  # fmt: skip


def _segments(keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Stable sort of ``keys`` -> (order, segment starts incl. end, the key of each segment)."""
    sorted_keys, order = torch.sort(keys, stable=True)
    unique, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
    starts = torch.zeros(unique.numel() + 1, dtype=torch.int64, device=keys.device)
    starts[1:] = torch.cumsum(counts, 0)
    return order, starts, unique


def _segment_sum_launch(
    src: Tensor, rows: Tensor, scale: Tensor | None, starts: Tensor, dest: Tensor, out: Tensor
) -> None:
    segments, width = dest.numel(), out.shape[1]
    if segments == 0:
        return
    block_s, block_c = gather_blocks(segments, width)
    grid = (triton.cdiv(segments, block_s), triton.cdiv(width, block_c))
    _segment_sum[grid](
        src, src.stride(0), src.stride(1), rows, rows if scale is None else scale, starts, dest,
        out, segments, width, BLOCK_S=block_s, BLOCK_C=block_c, HAS_SCALE=scale is not None,
    )  # fmt: skip


def scatter_deterministic(
    grad: Tensor,
    item_ids: Tensor,
    mask: Tensor,
    grad_item: Tensor,
    attr_offsets: Tensor | None,
    attr_ids: Tensor | None,
    grad_attr: Tensor | None,
) -> None:
    """``scatter_atomic`` without atomics: the same result, bit-identical from run to run.

    Positions are sorted by item id and each item row sums its segment in position order; the
    attribute rows then sum, in CSR order, the item sums divided by each item's count.
    """
    width = grad_item.shape[1]
    grad = grad.reshape(-1, width)
    positions = _flat(mask).nonzero().squeeze(1)
    order, starts, items = _segments(_flat(item_ids)[positions].long())
    _segment_sum_launch(grad, positions[order], None, starts, items, grad_item)
    if grad_attr is None or items.numel() == 0:
        return
    first, lengths = attr_offsets[items], attr_offsets[items + 1] - attr_offsets[items]
    owner = torch.repeat_interleave(torch.arange(items.numel(), device=items.device), lengths)
    before = torch.cumsum(lengths, 0) - lengths
    entries = first[owner] + torch.arange(owner.numel(), device=owner.device) - before[owner]
    order, starts, attrs = _segments(attr_ids[entries].long())
    scale = 1.0 / lengths[owner].to(torch.float32)
    _segment_sum_launch(grad_item, items[owner][order], scale[order], starts, attrs, grad_attr)


def gather_embed_backward(
    grad: Tensor,
    item_ids: Tensor,
    mask: Tensor,
    item_rows: int,
    attr_offsets: Tensor | None,
    attr_ids: Tensor | None,
    attr_rows: int,
    deterministic: bool,
) -> tuple[Tensor, Tensor | None]:
    """Dense fp32 gradients of the item table (item_rows, D) and of the attribute table
    (attr_rows, D), None without attributes."""
    width = grad.shape[-1]
    grad_item = grad.new_zeros(item_rows, width, dtype=torch.float32)
    grad_attr = None if attr_ids is None else grad_item.new_zeros(attr_rows, width)
    scatter = scatter_deterministic if deterministic else scatter_atomic
    scatter(grad, item_ids, mask, grad_item, attr_offsets, attr_ids, grad_attr)
    return grad_item, grad_attr
