"""Triton kernels of ``conv_pool``: one level's left-padded strided grouped conv and both pools.

Three kernels, each reading its level input from a ``RowSource``: a (B, L, D) tensor, or item
ids + tables rebuilt in registers by ``gather_rows`` (the fused ``embed_conv_pool``).

* forward: a program owns a tile of windows of one batch row and a channel tile of one head;
  for each kernel offset j it loads the rows at ``window * stride + j - pad`` and accumulates
  ``rows @ W_j`` (``tl.dot``) and the two window sums; the divisor is k, or the count of real
  positions when mask-aware.
* input gradient: a program owns the positions whose window index ``(pos + pad) // stride`` is
  in its tile; position ``window * stride + r - pad`` receives, for each j = r, r + s, ... < k,
  ``g_conv[window - (j - r) // s] @ W_j^T`` plus the pooled gradients of that window, so every
  position is written by exactly one program (no atomics, overlapping windows included) and the
  k products are all useful work.
* weight gradient: a split-K GEMM ``sum_windows g_conv^T x_j`` per offset j; each program sums
  a fixed, strided share of window tiles into its own fp32 partial, and the host adds the
  partials in order, so the result is deterministic.

Layouts: the conv weight (D, D/H, k) is passed as ``wt[j, h, c_in, c_out]`` (contiguous), outputs
are contiguous, inputs and gradients may have any strides. Elementwise math is fp32; ``tl.dot``
operands stay in the storage dtype (tensor cores for fp16/bf16) and accumulate in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from convrec.schedule import left_pad, out_length

from .gather_embed import attribute_args, gather_rows, scatter_rows
from .launch import channel_block, dot_precision, partial_programs, row_block


@triton.jit
def _input_rows(
    row,
    ok,
    cols,
    cols_ok,
    x_ptr,
    sx_col,
    ids_ptr,
    item_ptr,
    item_stride,
    off_ptr,
    attr_ids_ptr,
    attr_ptr,
    attr_stride,
    GATHER: tl.constexpr,
    HAS_ATTR: tl.constexpr,
):
    """fp32 tile of level-input rows. ``row`` is the flat position ``b * L + pos`` when gathering,
    the element offset ``b * stride_b + pos * stride_l`` otherwise; rows outside ``ok`` are 0."""
    if GATHER:
        ids = tl.load(ids_ptr + row, mask=ok, other=0).to(tl.int64)
        x = gather_rows(
            ids, ok, cols, cols_ok, item_ptr, item_stride, off_ptr, attr_ids_ptr, attr_ptr,
            attr_stride, HAS_ATTR,
        )  # fmt: skip
    else:
        src = x_ptr + row[:, None] + cols[None, :] * sx_col
        x = tl.load(src, mask=ok[:, None] & cols_ok[None, :], other=0.0).to(tl.float32)
    return x


@triton.jit
def _conv_pool_fwd(
    # level input: a tensor (x, strides) or ids + tables (GATHER)
    x_ptr, sx_b, sx_l, sx_d,
    ids_ptr, item_ptr, item_stride, off_ptr, attr_ids_ptr, attr_ptr, attr_stride,
    r_ptr, sr_b, sr_l, sr_d,  # long residual (HAS_RES)
    mask_ptr, wt_ptr, bias_ptr,  # mask (B, L) uint8 contiguous (APPLY_MASK)
    conv_ptr, pool_ptr, res_ptr, counts_ptr,  # outputs (B, L_out, D) and (B, L_out) int32
    length, out_len, pad, tiles,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, CBLOCKS: tl.constexpr,
    GATHER: tl.constexpr, HAS_ATTR: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
    APPLY_MASK: tl.constexpr, MASK_AWARE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b = pid // tiles
    win = (pid % tiles) * BLOCK_W + tl.arange(0, BLOCK_W)
    win_ok = win < out_len
    head = tl.program_id(1) // CBLOCKS
    cblock = tl.program_id(1) % CBLOCKS
    c_out = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
    c_out_ok = c_out < HEAD_DIM
    col = head * HEAD_DIM + c_out
    acc = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
    pool = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
    res = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
    count = tl.zeros((BLOCK_W,), tl.int32)
    for j in range(KERNEL):
        pos = win * STRIDE + j - pad
        ok = win_ok & (pos >= 0) & (pos < length)
        if APPLY_MASK:
            ok = ok & (tl.load(mask_ptr + b * length + pos, mask=ok, other=0) != 0)
        count += ok.to(tl.int32)
        if GATHER:
            row = b * length + pos
        else:
            row = b * sx_b + pos * sx_l
        for kb in range(CBLOCKS):
            c_in = kb * BLOCK_C + tl.arange(0, BLOCK_C)
            c_in_ok = c_in < HEAD_DIM
            x = _input_rows(
                row, ok, head * HEAD_DIM + c_in, c_in_ok, x_ptr, sx_d, ids_ptr, item_ptr,
                item_stride, off_ptr, attr_ids_ptr, attr_ptr, attr_stride, GATHER, HAS_ATTR,
            )  # fmt: skip
            w_src = wt_ptr + ((j * HEADS + head) * HEAD_DIM + c_in[:, None]) * HEAD_DIM + c_out
            w = tl.load(w_src, mask=c_in_ok[:, None] & c_out_ok[None, :], other=0.0)
            acc = tl.dot(x.to(w.dtype), w, acc, input_precision=PRECISION)
            if kb == cblock:  # the same channels: the pool reuses the loaded tile
                pool += x
        if HAS_RES:
            r_src = r_ptr + (b * sr_b + pos * sr_l)[:, None] + col[None, :] * sr_d
            res += tl.load(r_src, mask=ok[:, None] & c_out_ok[None, :], other=0.0).to(tl.float32)
    if MASK_AWARE:
        divisor = tl.maximum(count, 1).to(tl.float32)[:, None]
    else:
        divisor = KERNEL
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col, mask=c_out_ok, other=0.0).to(tl.float32)[None, :]
    out = ((b * out_len + win) * (HEADS * HEAD_DIM))[:, None] + col[None, :]
    out_ok = win_ok[:, None] & c_out_ok[None, :]
    tl.store(conv_ptr + out, acc.to(conv_ptr.dtype.element_ty), mask=out_ok)
    tl.store(pool_ptr + out, (pool / divisor).to(pool_ptr.dtype.element_ty), mask=out_ok)
    if HAS_RES:
        tl.store(res_ptr + out, (res / divisor).to(res_ptr.dtype.element_ty), mask=out_ok)
    if tl.program_id(1) == 0:
        tl.store(counts_ptr + b * out_len + win, count, mask=win_ok)


@triton.jit
def _conv_pool_bwd_input(
    gc_ptr, sgc_b, sgc_l, sgc_d,  # gradient of conv
    gp_ptr, sgp_b, sgp_l, sgp_d,  # gradient of pooled
    gr_ptr, sgr_b, sgr_l, sgr_d,  # gradient of pooled residual (HAS_RES)
    counts_ptr, mask_ptr, wt_ptr,
    gx_ptr, gres_ptr,  # outputs (B, L, D) contiguous, unless SCATTER
    ids_ptr, grad_item_ptr, off_ptr, attr_ids_ptr, grad_attr_ptr,  # SCATTER targets (fp32)
    length, out_len, pad, tiles,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, CBLOCKS: tl.constexpr,
    HAS_RES: tl.constexpr, APPLY_MASK: tl.constexpr, MASK_AWARE: tl.constexpr,
    SCATTER: tl.constexpr, HAS_ATTR: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b = pid // tiles
    home = (pid % tiles) * BLOCK_W + tl.arange(0, BLOCK_W)
    head = tl.program_id(1) // CBLOCKS
    c = (tl.program_id(1) % CBLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < HEAD_DIM
    col = head * HEAD_DIM + c
    width = HEADS * HEAD_DIM
    for r in range(STRIDE):
        pos = home * STRIDE + r - pad
        ok = (pos >= 0) & (pos < length)
        gx = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
        gres = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
        for j in range(r, KERNEL, STRIDE):
            src = home - (j - r) // STRIDE
            src_ok = ok & (src >= 0) & (src < out_len)
            if MASK_AWARE:
                count = tl.load(counts_ptr + b * out_len + src, mask=src_ok, other=1)
                divisor = tl.maximum(count, 1).to(tl.float32)[:, None]
            else:
                divisor = KERNEL
            both = src_ok[:, None] & c_ok[None, :]
            gp_src = gp_ptr + (b * sgp_b + src * sgp_l)[:, None] + col[None, :] * sgp_d
            gx += tl.load(gp_src, mask=both, other=0.0).to(tl.float32) / divisor
            if HAS_RES:
                gr_src = gr_ptr + (b * sgr_b + src * sgr_l)[:, None] + col[None, :] * sgr_d
                gres += tl.load(gr_src, mask=both, other=0.0).to(tl.float32) / divisor
            for ob in range(CBLOCKS):
                o = ob * BLOCK_C + tl.arange(0, BLOCK_C)
                o_ok = o < HEAD_DIM
                g_src = gc_ptr + (b * sgc_b + src * sgc_l)[:, None]
                g = tl.load(
                    g_src + (head * HEAD_DIM + o)[None, :] * sgc_d,
                    mask=src_ok[:, None] & o_ok[None, :],
                    other=0.0,
                )
                w_src = (
                    wt_ptr + ((j * HEADS + head) * HEAD_DIM + c[None, :]) * HEAD_DIM + o[:, None]
                )
                w = tl.load(w_src, mask=o_ok[:, None] & c_ok[None, :], other=0.0)  # W_j^T tile
                gx = tl.dot(g.to(w.dtype), w, gx, input_precision=PRECISION)
        flat = b * length + pos
        if APPLY_MASK:
            keep = tl.load(mask_ptr + flat, mask=ok, other=0) != 0
            gx = tl.where(keep[:, None], gx, 0.0)
            gres = tl.where(keep[:, None], gres, 0.0)
        else:
            keep = ok
        if SCATTER:
            real = ok & keep
            ids = tl.load(ids_ptr + flat, mask=real, other=0).to(tl.int64)
            scatter_rows(
                gx, ids, real, col, c_ok, grad_item_ptr, width, off_ptr, attr_ids_ptr,
                grad_attr_ptr, HAS_ATTR,
            )  # fmt: skip
        else:
            dst = (flat * width)[:, None] + col[None, :]
            both = ok[:, None] & c_ok[None, :]
            tl.store(gx_ptr + dst, gx.to(gx_ptr.dtype.element_ty), mask=both)
            if HAS_RES:
                tl.store(gres_ptr + dst, gres.to(gres_ptr.dtype.element_ty), mask=both)


@triton.jit
def _conv_pool_bwd_weight(
    gc_ptr, sgc_b, sgc_l, sgc_d,  # gradient of conv
    x_ptr, sx_b, sx_l, sx_d,  # level input: a tensor, or ids + tables (GATHER)
    ids_ptr, item_ptr, item_stride, off_ptr, attr_ids_ptr, attr_ptr, attr_stride,
    mask_ptr, part_ptr,  # partials (programs, k, H, DH, DH) fp32 [p, j, h, c_in, c_out]
    length, out_len, pad, rows_total, programs,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, KERNEL: tl.constexpr, STRIDE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CBLOCKS: tl.constexpr,
    GATHER: tl.constexpr, HAS_ATTR: tl.constexpr, APPLY_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    part = tl.program_id(0)
    head = tl.program_id(1) // (CBLOCKS * CBLOCKS)
    c_in = (tl.program_id(1) // CBLOCKS % CBLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_out = (tl.program_id(1) % CBLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in_ok, c_out_ok = c_in < HEAD_DIM, c_out < HEAD_DIM
    tiles = tl.cdiv(rows_total, BLOCK_R)
    for j in range(KERNEL):
        acc = tl.zeros((BLOCK_C, BLOCK_C), tl.float32)
        for t in range(part, tiles, programs):
            rows = tl.arange(0, BLOCK_R).to(tl.int64) + t * BLOCK_R  # flat (batch, window)
            rows_ok = rows < rows_total
            b = rows // out_len
            win = rows % out_len
            pos = win * STRIDE + j - pad
            ok = rows_ok & (pos >= 0) & (pos < length)
            if APPLY_MASK:
                ok = ok & (tl.load(mask_ptr + b * length + pos, mask=ok, other=0) != 0)
            if GATHER:
                row = b * length + pos
            else:
                row = b * sx_b + pos * sx_l
            x = _input_rows(
                row, ok, head * HEAD_DIM + c_in, c_in_ok, x_ptr, sx_d, ids_ptr, item_ptr,
                item_stride, off_ptr, attr_ids_ptr, attr_ptr, attr_stride, GATHER, HAS_ATTR,
            )  # fmt: skip
            g_src = gc_ptr + (b * sgc_b + win * sgc_l)[:, None]
            g = tl.load(
                g_src + (head * HEAD_DIM + c_out)[None, :] * sgc_d,
                mask=rows_ok[:, None] & c_out_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(tl.trans(x.to(g.dtype)), g, acc, input_precision=PRECISION)
        dst = ((part * KERNEL + j) * HEADS + head).to(tl.int64) * HEAD_DIM + c_in[:, None]
        tl.store(part_ptr + dst * HEAD_DIM + c_out[None, :], acc, mask=c_in_ok[:, None] & c_out_ok)


class RowSource(NamedTuple):
    """Where the kernels read level-input rows: the 11 source arguments and their flags."""

    args: tuple
    gather: bool
    has_attr: bool


def tensor_source(x: Tensor) -> RowSource:
    """Rows of a (B, L, D) tensor, any strides."""
    return RowSource((x, *x.stride(), x, x, 0, x, x, x, 0), False, False)


def table_source(
    item_ids: Tensor,
    item_table: Tensor,
    attr_offsets: Tensor | None,
    attr_ids: Tensor | None,
    attr_table: Tensor | None,
) -> RowSource:
    """Rows rebuilt from (B, L) ids and the tables (see ``gather_rows``); tables contiguous."""
    ids = item_ids.contiguous()
    offsets, a_ids, a_table, a_stride = attribute_args(attr_offsets, attr_ids, attr_table, ids)
    args = (ids, 0, 0, 0, ids, item_table, item_table.stride(0), offsets, a_ids, a_table, a_stride)
    return RowSource(args, True, attr_table is not None)


class Level(NamedTuple):
    """Geometry and tiling of one level, shared by its three kernels."""

    batch: int
    length: int
    out_len: int
    pad: int
    heads: int
    head_dim: int
    kernel: int
    stride: int
    block_c: int
    cblocks: int

    @classmethod
    def of(cls, batch: int, length: int, weight: Tensor, stride: int, heads: int) -> Level:
        width, head_dim, kernel = weight.shape[0], weight.shape[1], weight.shape[2]
        if width != heads * head_dim:
            raise ValueError(f"conv weight {tuple(weight.shape)} does not fit {heads} heads")
        block_c = channel_block(head_dim)
        return cls(
            batch,
            length,
            out_length(length, kernel, stride),
            left_pad(length, kernel, stride),
            heads,
            head_dim,
            kernel,
            stride,
            block_c,
            triton.cdiv(head_dim, block_c),
        )

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def constants(self) -> dict[str, int]:
        return dict(
            HEADS=self.heads,
            HEAD_DIM=self.head_dim,
            KERNEL=self.kernel,
            STRIDE=self.stride,
            BLOCK_C=self.block_c,
            CBLOCKS=self.cblocks,
        )


def kernel_major(weight: Tensor, heads: int) -> Tensor:
    """(D, D/H, k) conv weight -> contiguous ``wt[j, h, c_in, c_out]``."""
    _, head_dim, kernel = weight.shape
    return weight.view(heads, head_dim, head_dim, kernel).permute(3, 0, 2, 1).contiguous()


def _mask_arg(mask: Tensor | None, dummy: Tensor) -> Tensor:
    return dummy if mask is None else mask.contiguous().view(torch.uint8)


def level_forward(
    level: Level,
    source: RowSource,
    residual: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    mask_aware: bool,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """(conv, pooled, pooled residual or None, counts) of one level; ``mask`` zeroes inputs."""
    shape = (level.batch, level.out_len, level.width)
    conv = weight.new_empty(shape, dtype=dtype)
    pooled = torch.empty_like(conv)
    pooled_res = None if residual is None else torch.empty_like(conv)
    counts = conv.new_empty(level.batch, level.out_len, dtype=torch.int32)
    block_w = row_block(level.out_len)
    tiles = triton.cdiv(level.out_len, block_w)
    res_args = (conv, 0, 0, 0) if residual is None else (residual, *residual.stride())
    bias_arg = conv if bias is None else bias.contiguous()
    grid = (level.batch * tiles, level.heads * level.cblocks)
    _conv_pool_fwd[grid](
        *source.args, *res_args, _mask_arg(mask, conv), kernel_major(weight, level.heads),
        bias_arg, conv, pooled, conv if pooled_res is None else pooled_res, counts,
        level.length, level.out_len, level.pad, tiles, **level.constants(), BLOCK_W=block_w,
        GATHER=source.gather, HAS_ATTR=source.has_attr, HAS_RES=residual is not None,
        HAS_BIAS=bias is not None, APPLY_MASK=mask is not None, MASK_AWARE=mask_aware,
        PRECISION=dot_precision(weight.dtype),
    )  # fmt: skip
    return conv, pooled, pooled_res, counts


class ScatterTarget(NamedTuple):
    """Fp32 table gradients the input-gradient kernel adds into (fused backward)."""

    item_ids: Tensor
    grad_item: Tensor
    attr_offsets: Tensor | None
    attr_ids: Tensor | None
    grad_attr: Tensor | None


def level_backward_input(
    level: Level,
    g_conv: Tensor,
    g_pool: Tensor,
    g_res: Tensor | None,
    weight: Tensor,
    mask: Tensor | None,
    counts: Tensor,
    mask_aware: bool,
    dtype: torch.dtype,
    scatter: ScatterTarget | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of the level input and residual, (B, L, D) each; with ``scatter`` the input
    gradient is added into the table gradients instead and (None, None) is returned."""
    shape = (level.batch, level.length, level.width)
    grad_x = None if scatter else g_conv.new_empty(shape, dtype=dtype)
    grad_res = None if g_res is None else g_conv.new_empty(shape, dtype=dtype)
    dummy = g_conv
    block_w = row_block(level.out_len)
    tiles = triton.cdiv(level.out_len + (level.kernel - 1) // level.stride, block_w)
    if scatter is None:
        targets = (dummy, dummy, dummy, dummy, dummy)
        has_attr = False
    else:
        offsets, a_ids, a_grad, _ = attribute_args(
            scatter.attr_offsets, scatter.attr_ids, scatter.grad_attr, dummy
        )
        targets = (scatter.item_ids.contiguous(), scatter.grad_item, offsets, a_ids, a_grad)
        has_attr = scatter.grad_attr is not None
    res_args = (dummy, 0, 0, 0) if g_res is None else (g_res, *g_res.stride())
    grid = (level.batch * tiles, level.heads * level.cblocks)
    _conv_pool_bwd_input[grid](
        g_conv, *g_conv.stride(), g_pool, *g_pool.stride(), *res_args, counts,
        _mask_arg(mask, dummy), kernel_major(weight, level.heads),
        dummy if grad_x is None else grad_x, dummy if grad_res is None else grad_res, *targets,
        level.length, level.out_len, level.pad, tiles, **level.constants(), BLOCK_W=block_w,
        HAS_RES=g_res is not None, APPLY_MASK=mask is not None, MASK_AWARE=mask_aware,
        SCATTER=scatter is not None, HAS_ATTR=has_attr, PRECISION=dot_precision(weight.dtype),
    )  # fmt: skip
    return grad_x, grad_res


def level_backward_weight(
    level: Level, g_conv: Tensor, source: RowSource, weight: Tensor, mask: Tensor | None
) -> Tensor:
    """Gradient of the conv weight (D, D/H, k) in the weight's dtype, deterministic."""
    rows_total = level.batch * level.out_len
    block_r = row_block(rows_total)
    partial_size = level.kernel * level.width * level.head_dim
    tile_programs = level.heads * level.cblocks * level.cblocks
    tiles = triton.cdiv(rows_total, block_r)
    programs = partial_programs(tiles, partial_size, tile_programs, g_conv.device)
    partials = g_conv.new_empty(
        programs, level.kernel, level.heads, level.head_dim, level.head_dim, dtype=torch.float32
    )
    grid = (programs, tile_programs)
    _conv_pool_bwd_weight[grid](
        g_conv, *g_conv.stride(), *source.args, _mask_arg(mask, g_conv), partials, level.length,
        level.out_len, level.pad, rows_total, programs, **level.constants(), BLOCK_R=block_r,
        GATHER=source.gather, HAS_ATTR=source.has_attr, APPLY_MASK=mask is not None,
        PRECISION=dot_precision(weight.dtype),
    )  # fmt: skip
    total = partials.sum(0)  # (k, H, c_in, c_out), summed in a fixed order
    return total.permute(1, 3, 2, 0).reshape(weight.shape).to(weight.dtype)


def conv_pool_forward(
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: int,
    heads: int,
    mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(conv, pooled, pooled residual, counts); mask-aware exactly when ``mask`` is given."""
    level = Level.of(x.shape[0], x.shape[1], weight, stride, heads)
    conv, pooled, pooled_res, counts = level_forward(
        level, tensor_source(x), residual, weight, bias, mask, mask is not None, x.dtype
    )
    return conv, pooled, pooled_res, counts


def conv_pool_backward(
    g_conv: Tensor,
    g_pool: Tensor,
    g_res: Tensor,
    x: Tensor,
    weight: Tensor,
    mask: Tensor | None,
    counts: Tensor,
    stride: int,
    heads: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x, residual, weight and bias (bias in fp32 summed, cast to x's dtype)."""
    level = Level.of(x.shape[0], x.shape[1], weight, stride, heads)
    grad_x, grad_res = level_backward_input(
        level, g_conv, g_pool, g_res, weight, mask, counts, mask is not None, x.dtype
    )
    grad_w = level_backward_weight(level, g_conv, tensor_source(x), weight, mask)
    grad_b = g_conv.sum((0, 1), dtype=torch.float32).to(weight.dtype)
    return grad_x, grad_res, grad_w, grad_b
