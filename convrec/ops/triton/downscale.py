"""Triton kernels of ``downscale``: the whole level stack in one launch per direction.

A program owns one batch row and walks every level of the stack (levels depend on each other
position by position, so a row is the natural unit of work that needs no grid-wide barrier).
Long rows are cut into chunks over their leading kernel == stride levels (``chunking``): those
windows tile the positions, so a chunk's windows at every such level depend on its own inputs
only, and one program per chunk walks them; a second launch runs the remaining levels and the
readout per row. Within a level a program walks tiles of ``BLOCK_W`` windows with all D channels
in registers, so the Linear, GELU, dropout, residual mix and LayerNorm of a window run where its
convolution was computed. Level outputs go to a per-row workspace that the next level reads
back after a ``tl.debug_barrier`` (the threads of a program share global memory, not registers).

Launches per call: forward = ``_fold_levels`` + ``_stack_forward`` (twice when chunked);
backward = ``_stack_backward`` (twice when chunked) + ``_sum_partials`` + ``_unfold_levels``.
None of them is a dispatched op: the Python wrappers (``convrec.ops.downscale_triton``) make
each direction one custom op.

* ``_fold_levels`` folds each level's grouped conv and Linear into one (D, D) weight per kernel
  offset j, ``W_j = blockdiag(conv_j) @ linear^T``, and the bias ``linear @ conv_b + lin_b``.
* forward, per window tile: ``acc = sum_j x[w*s + j - pad] @ W_j`` (``tl.dot``), the window sums
  of the level input and of the long residual, then the epilogue of ``level_mix``. It stores the
  level output, the pooled residual and per window (LayerNorm mean, 1/std, real positions).
* backward, levels in reverse: pass A recomputes each window's pre-activation from the saved
  level input, takes the gradient through LayerNorm, the mix, dropout and GELU (``g_z``), and
  scatters ``g_z @ W_j^T`` plus the pooled terms to the window's input positions: a plain store
  when kernel == stride (each position has one window), a read-add-write separated by barriers
  otherwise. Pass B sums ``x_j^T @ g_z`` per offset into this program's fp32 (fp64) partial.
* ``_sum_partials`` adds the per-program partials in a fixed order (deterministic; one buffer
  per backward launch, holding only its levels' columns, so chunks write no unused slots), and
  ``_unfold_levels`` maps the folded gradients back onto the packed layout
  (``convrec.ops.level_params``): one gradient for the whole stack.

Arithmetic is in the accumulation dtype (fp64 for fp64 inputs, else fp32; the workspace too);
with fp16/bf16 inputs the products run on tensor cores in the input dtype. Scalars that must be
exact in fp64 (dropout scale, eps) arrive as an fp32 (hi, lo) pair: Triton passes Python floats
as fp32.

``plan`` (an int64 table, one row of ``PLAN_FIELDS`` per level, ``stack_layout``, copied to the
device once per geometry) holds each level's geometry and its offsets in the parameter, fold,
workspace and partial buffers.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from convrec.schedule import level_geometry

from .launch import stack_chunks, stack_launch
from .stack_dropout import dropout_factors

# Columns of the plan table (constexpr: the kernels index it with these names).
K = tl.constexpr(0)
S = tl.constexpr(1)
PAD = tl.constexpr(2)
N_IN = tl.constexpr(3)
N_OUT = tl.constexpr(4)
PARAM = tl.constexpr(5)
FOLD = tl.constexpr(6)
X_IN = tl.constexpr(7)
R_IN = tl.constexpr(8)
STAT_IN = tl.constexpr(9)
X_OUT = tl.constexpr(10)
R_OUT = tl.constexpr(11)
STAT_OUT = tl.constexpr(12)
GX_IN = tl.constexpr(13)
GR_IN = tl.constexpr(14)
GZ = tl.constexpr(15)
PART_W = tl.constexpr(16)
PART_MISC = tl.constexpr(17)
PLAN_FIELDS = tl.constexpr(18)
STATS = 3  # per window: LayerNorm mean, 1 / std, real positions in the window


# Integer arguments that change with the history length, the batch or the phase of a call:
# Triton would compile a variant per value class (1, multiples of 16, others) of each, many
# compilations per shape mix; offsets are read from the plan anyway, and D stays specialized.
_VARYING = ("length", "levels", "first", "last", "chunk_units", "ws_row", "threshold")


class StackLayout(NamedTuple):
    """Geometry and buffer offsets of one stack on one input length (``stack_layout``)."""

    rows: tuple[tuple[int, ...], ...]  # per level, PLAN_FIELDS values
    fold_size: int  # elements of the folded weights and biases
    forward_row: int  # workspace elements per batch row (forward; saved for backward)
    backward_row: int  # gradient workspace elements per batch row
    partial_row: int  # parameter-gradient partial elements per batch row


def stack_layout(
    length: int, kernels: tuple[int, ...], strides: tuple[int, ...], d: int, heads: int
) -> StackLayout:
    """Where every level keeps what, for inputs of ``length`` positions (pure Python: the fake
    implementation sizes the saved buffers with it, symbolic sizes included). The parameter
    offsets repeat ``convrec.ops.level_params``'s layout, as ``_param_offsets`` does; a test
    pins them together."""
    rows = []
    param = fold = 0
    forward = 1  # element 0: the divisor of the position mean (user vector)
    backward = partial = 0
    n_in = length
    x_in = r_in = stat_in = -1  # level 0 reads the op's inputs
    geometry = level_geometry(length, list(zip(kernels, strides, strict=True)))
    for (pad, n_out), k, s in zip(geometry, kernels, strides, strict=True):
        x_out, r_out, stat_out = forward, forward + n_out * d, forward + 2 * n_out * d
        forward += n_out * (2 * d + STATS)
        if x_in < 0 and k == s:  # level 0 writes its input gradients to the op's outputs
            gx_in = gr_in = -1
        else:
            gx_in, gr_in = backward, backward + n_in * d
            backward += 2 * n_in * d
        gz = backward
        backward += n_out * d
        part_w, part_misc = partial, partial + k * d * d
        partial += k * d * d + 3 * d + 2
        rows.append((k, s, pad, n_in, n_out, param, fold, x_in, r_in, stat_in, x_out, r_out,
                     stat_out, gx_in, gr_in, gz, part_w, part_misc))  # fmt: skip
        param += d * (d // heads) * k + d * d + 4 * d + 2  # ops.level_params.level_size
        fold += k * d * d + d
        n_in, x_in, r_in, stat_in = n_out, x_out, r_out, stat_out
    return StackLayout(tuple(rows), fold, forward, backward, partial)


@functools.lru_cache(maxsize=256)
def _plan(
    length: int,
    kernels: tuple[int, ...],
    strides: tuple[int, ...],
    d: int,
    heads: int,
    device: torch.device,
) -> tuple[StackLayout, Tensor]:
    """The layout and its rows as the int64 device table the kernels read (cached: one small
    host-to-device copy per geometry and device, none per call)."""
    layout = stack_layout(length, kernels, strides, d, heads)
    return layout, torch.tensor(layout.rows, dtype=torch.int64, device=device)


@triton.jit
def _field(plan_ptr, level, column):
    """plan[level, column] as int32: offsets within one batch row's buffers (``stack_layout``
    keeps them below 2^31), so tiles of offsets and pointers take one register per element
    fewer than int64 ones; row bases are int64 scalars."""
    return tl.load(plan_ptr + level * PLAN_FIELDS + column).to(tl.int32)


@triton.jit
def _level_geometry(plan_ptr, level):
    """(kernel, stride, left pad, input and output positions, offset of the folded weights)."""
    k = _field(plan_ptr, level, K)
    s = _field(plan_ptr, level, S)
    pad = _field(plan_ptr, level, PAD)
    n_in = _field(plan_ptr, level, N_IN)
    return k, s, pad, n_in, _field(plan_ptr, level, N_OUT), _field(plan_ptr, level, FOLD)


@triton.jit
def _param_offsets(base, d, hd, k):
    """Offsets of conv_bias, linear_weight, linear_bias, alpha, beta, norm_weight, norm_bias of
    the level whose conv_weight starts at ``base`` (``PackedLevels`` layout)."""
    conv_b = base + d * hd * k
    lin_w = conv_b + d
    lin_b = lin_w + d * d
    alpha = lin_b + d
    return conv_b, lin_w, lin_b, alpha, alpha + 1, alpha + 2, alpha + 2 + d


@triton.jit
def _window_range(plan_ptr, level, last, chunk, chunk_units):
    """[lo, hi) of level ``level``'s windows that ``chunk`` computes: its ``chunk_units``
    positions of the output of level ``last - 1``, followed down through the levels between
    (the inputs of a window range are the windows of the level below)."""
    lo = chunk * chunk_units
    hi = tl.minimum(lo + chunk_units, _field(plan_ptr, last - 1, N_OUT))
    for step in range(0, last - 1 - level):
        above = last - 1 - step
        k = _field(plan_ptr, above, K)
        s = _field(plan_ptr, above, S)
        pad = _field(plan_ptr, above, PAD)
        new_lo = tl.maximum(lo * s - pad, 0)
        hi = tl.minimum((hi - 1) * s + k - pad, _field(plan_ptr, above, N_IN))
        lo = new_lo
    return lo, hi


@triton.jit
def _dot(a, b, acc, like_ptr, HALF_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b; with HALF_DOT the operands go to the tensor cores in ``like_ptr``'s dtype."""
    if HALF_DOT:
        out = tl.dot(a.to(like_ptr.dtype.element_ty), b.to(like_ptr.dtype.element_ty), acc)
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _row_masks(
    pos, in_range, mask_row, stat_in,
    FIRST: tl.constexpr, HAS_MASK: tl.constexpr, HAS_RES: tl.constexpr, MASK_AWARE: tl.constexpr,
):  # fmt: skip
    """(read x, read the residual, counts as real) per window row at level-input positions
    ``pos``. Level 0: the op's mask zeroes x, and the residual when it is x itself or the pools
    are mask-aware; later levels: mask-aware pools skip windows of the level below that held no
    real position (their stored count is 0)."""
    if FIRST:
        if HAS_MASK:
            real = in_range & (tl.load(mask_row + pos, mask=in_range, other=0) != 0)
        else:
            real = in_range
        x_ok = real
        if MASK_AWARE or not HAS_RES:
            r_ok = real
        else:
            r_ok = in_range
    else:
        if MASK_AWARE:
            real = in_range & (tl.load(stat_in + pos * 3 + 2, mask=in_range, other=0) > 0)
        else:
            real = in_range
        x_ok = real
        r_ok = real
    return x_ok, r_ok, real


@triton.jit
def _window_conv(
    w, w_ok, k, s, pad, n_in, src, mask_row, stat_in, fold_w, cols, cols_ok, d, like_ptr,
    acc_ty: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
    FIRST: tl.constexpr, HAS_MASK: tl.constexpr, HAS_RES: tl.constexpr,
    MASK_AWARE: tl.constexpr, HALF_DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Folded conv (before its bias), window sum of the level input and real-position count of
    the windows ``w``."""
    acc = tl.zeros((BLOCK_W, BLOCK_D), acc_ty)
    pool = tl.zeros((BLOCK_W, BLOCK_D), acc_ty)
    real = tl.zeros((BLOCK_W,), tl.int32)
    both = cols_ok[:, None] & cols_ok[None, :]
    for j in range(k):
        pos = w * s + j - pad
        in_range = w_ok & (pos >= 0) & (pos < n_in)
        x_ok, _r_ok, real_j = _row_masks(
            pos, in_range, mask_row, stat_in, FIRST, HAS_MASK, HAS_RES, MASK_AWARE
        )
        tile = src + pos[:, None] * d + cols[None, :]
        xt = tl.load(tile, mask=x_ok[:, None] & cols_ok[None, :], other=0.0).to(acc_ty)
        wj = tl.load(fold_w + j * d * d + cols[:, None] * d + cols[None, :], mask=both, other=0.0)
        acc = _dot(xt, wj, acc, like_ptr, HALF_DOT, PRECISION)
        pool += xt
        real += real_j.to(tl.int32)
    return acc, pool, real


@triton.jit
def _window_residual(
    w, w_ok, k, s, pad, n_in, res_src, mask_row, stat_in, cols, cols_ok, d,
    acc_ty: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
    FIRST: tl.constexpr, HAS_MASK: tl.constexpr, HAS_RES: tl.constexpr, MASK_AWARE: tl.constexpr,
):  # fmt: skip
    """Window sum of the long residual."""
    res = tl.zeros((BLOCK_W, BLOCK_D), acc_ty)
    for j in range(k):
        pos = w * s + j - pad
        in_range = w_ok & (pos >= 0) & (pos < n_in)
        _x_ok, r_ok, _real = _row_masks(
            pos, in_range, mask_row, stat_in, FIRST, HAS_MASK, HAS_RES, MASK_AWARE
        )
        tile = res_src + pos[:, None] * d + cols[None, :]
        res += tl.load(tile, mask=r_ok[:, None] & cols_ok[None, :], other=0.0).to(acc_ty)
    return res


@triton.jit
def _gelu_parts(z):
    """(GELU(z), Phi(z)): exact (erf) GELU and the normal CDF its derivative reuses."""
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return z * cdf, cdf


@triton.jit
def _level_vectors(plan_ptr, params_ptr, fold_ptr, level, k, d, hd, cols, cols_ok, acc_ty):
    """(folded bias, alpha, beta, LayerNorm weight, LayerNorm bias) of a level."""
    _conv_b, _lin_w, _lin_b, alpha_at, beta_at, nw_at, nb_at = _param_offsets(
        _field(plan_ptr, level, PARAM), d, hd, k
    )
    bias = tl.load(fold_ptr + _field(plan_ptr, level, FOLD) + k * d * d + cols, mask=cols_ok)
    alpha = tl.load(params_ptr + alpha_at).to(acc_ty)
    beta = tl.load(params_ptr + beta_at).to(acc_ty)
    nw = tl.load(params_ptr + nw_at + cols, mask=cols_ok, other=0.0).to(acc_ty)
    nb = tl.load(params_ptr + nb_at + cols, mask=cols_ok, other=0.0).to(acc_ty)
    return tl.where(cols_ok, bias, 0.0), alpha, beta, nw, nb


@triton.jit
def _window_factors(
    real, k, w, b, n_out, level, cols, seed_ptr, threshold, scale, acc_ty,
    BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, MASK_AWARE: tl.constexpr,
    DROPOUT: tl.constexpr,
):  # fmt: skip
    """(pool divisor, dropout factors) of the windows ``w``: k or the real positions (at least
    1); 1 / (1 - p) or 0 per element from the call's seed, or ones."""
    if MASK_AWARE:
        divisor = tl.maximum(real, 1).to(acc_ty)[:, None]
    else:
        divisor = k.to(acc_ty)
    factor = tl.full((BLOCK_W, BLOCK_D), 1.0, acc_ty)
    if DROPOUT:
        rows = b * n_out + w.to(tl.int64)
        factor = dropout_factors(seed_ptr, level, rows, cols.to(tl.int64), threshold, scale)
        factor = factor.to(acc_ty)
    return divisor, factor


@triton.jit
def _level_forward(
    level, w_lo, w_hi, b, src, res_src, mask_row, plan_ptr, params_ptr, fold_ptr, seed_ptr, ws,
    like_ptr, d, hd, threshold, scale, eps,
    BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, FIRST: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_RES: tl.constexpr, MASK_AWARE: tl.constexpr, DROPOUT: tl.constexpr,
    HALF_DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    acc_ty = ws.dtype.element_ty
    k, s, pad, n_in, n_out, fold = _level_geometry(plan_ptr, level)
    stat_in = ws + _field(plan_ptr, level, STAT_IN)
    x_out = ws + _field(plan_ptr, level, X_OUT)
    r_out = ws + _field(plan_ptr, level, R_OUT)
    stat_out = ws + _field(plan_ptr, level, STAT_OUT)
    cols = tl.arange(0, BLOCK_D)
    cols_ok = cols < d
    bias, alpha, beta, nw, nb = _level_vectors(
        plan_ptr, params_ptr, fold_ptr, level, k, d, hd, cols, cols_ok, acc_ty
    )
    for t in range(w_lo, w_hi, BLOCK_W):
        w = t + tl.arange(0, BLOCK_W)
        w_ok = w < w_hi
        acc, pool, real = _window_conv(
            w, w_ok, k, s, pad, n_in, src, mask_row, stat_in, fold_ptr + fold, cols, cols_ok,
            d, like_ptr, acc_ty, BLOCK_W, BLOCK_D, FIRST, HAS_MASK, HAS_RES, MASK_AWARE,
            HALF_DOT, PRECISION,
        )  # fmt: skip
        res = _window_residual(
            w, w_ok, k, s, pad, n_in, res_src, mask_row, stat_in, cols, cols_ok, d, acc_ty,
            BLOCK_W, BLOCK_D, FIRST, HAS_MASK, HAS_RES, MASK_AWARE,
        )  # fmt: skip
        divisor, factor = _window_factors(
            real, k, w, b, n_out, level, cols, seed_ptr, threshold, scale, acc_ty, BLOCK_W,
            BLOCK_D, MASK_AWARE, DROPOUT,
        )  # fmt: skip
        gelu, _cdf = _gelu_parts(acc + bias[None, :])
        pooled_res = res / divisor
        mixed = gelu * factor + alpha * (pool / divisor) + beta * pooled_res
        mean = tl.sum(mixed, 1) / d
        centred = tl.where(cols_ok[None, :], mixed - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / d + eps)
        out = centred * rstd[:, None] * nw[None, :] + nb[None, :]
        if MASK_AWARE:
            out = tl.where((real > 0)[:, None], out, 0.0)
        at = w[:, None] * d + cols[None, :]
        both = w_ok[:, None] & cols_ok[None, :]
        tl.store(x_out + at, out, mask=both)
        tl.store(r_out + at, pooled_res, mask=both)
        tl.store(stat_out + w * 3, mean, mask=w_ok)
        tl.store(stat_out + w * 3 + 1, rstd, mask=w_ok)
        tl.store(stat_out + w * 3 + 2, real.to(acc_ty), mask=w_ok)


@triton.jit(do_not_specialize=(*_VARYING, "readout"))
def _stack_forward(
    x_ptr, res_ptr, mask_ptr, params_ptr, fold_ptr, plan_ptr, seed_ptr, ws_ptr, user_ptr,
    length, levels, first, last, chunk_units, readout, d, hd, ws_row, threshold, scale_hi,
    scale_lo, eps_hi, eps_lo,
    BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, HAS_RES: tl.constexpr,
    MASK_AWARE: tl.constexpr, DROPOUT: tl.constexpr, HALF_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (b, chunk): levels [first, last) of batch row b over the chunk's windows, then
    (``readout``) the user vector."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    ws = ws_ptr + b * ws_row
    acc_ty = ws_ptr.dtype.element_ty
    scale = tl.cast(scale_hi, acc_ty) + tl.cast(scale_lo, acc_ty)  # fp64: ~48 bits
    eps = tl.cast(eps_hi, acc_ty) + tl.cast(eps_lo, acc_ty)
    src = x_ptr + b * length * d
    if HAS_RES:
        res_src = res_ptr + b * length * d
    else:
        res_src = src
    mask_row = mask_ptr + b * length
    if first == 0:
        lo, hi = _window_range(plan_ptr, 0, last, chunk, chunk_units)
        _level_forward(
            0, lo, hi, b, src, res_src, mask_row, plan_ptr, params_ptr, fold_ptr, seed_ptr, ws,
            x_ptr, d, hd, threshold, scale, eps, BLOCK_W, BLOCK_D, True, HAS_MASK, HAS_RES,
            MASK_AWARE, DROPOUT, HALF_DOT, PRECISION,
        )  # fmt: skip
    for level in range(tl.maximum(first, 1), last):
        tl.debug_barrier()
        x_in = ws + _field(plan_ptr, level, X_IN)
        r_in = ws + _field(plan_ptr, level, R_IN)
        lo, hi = _window_range(plan_ptr, level, last, chunk, chunk_units)
        _level_forward(
            level, lo, hi, b, x_in, r_in, mask_row, plan_ptr, params_ptr, fold_ptr, seed_ptr, ws,
            x_ptr, d, hd, threshold, scale, eps, BLOCK_W, BLOCK_D, False, HAS_MASK, HAS_RES,
            MASK_AWARE, DROPOUT, HALF_DOT, PRECISION,
        )  # fmt: skip
    if readout != 0:
        _readout(plan_ptr, levels, ws, user_ptr + b * d, d, BLOCK_W, BLOCK_D, MASK_AWARE)


@triton.jit
def _readout(
    plan_ptr, levels, ws, user_row, d,
    BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, MASK_AWARE: tl.constexpr,
):  # fmt: skip
    """The user vector: mean over the last level's windows (mask-aware: the real ones); its
    divisor goes to ws[0] for the backward."""
    acc_ty = ws.dtype.element_ty
    tl.debug_barrier()
    top = levels - 1
    n_top = _field(plan_ptr, top, N_OUT)
    x_top = ws + _field(plan_ptr, top, X_OUT)
    stat_top = ws + _field(plan_ptr, top, STAT_OUT)
    cols = tl.arange(0, BLOCK_D)
    cols_ok = cols < d
    total = tl.zeros((BLOCK_D,), acc_ty)
    count = tl.zeros((BLOCK_W,), acc_ty)
    for t in range(0, n_top, BLOCK_W):
        w = t + tl.arange(0, BLOCK_W)
        w_ok = w < n_top
        if MASK_AWARE:
            w_ok = w_ok & (tl.load(stat_top + w * 3 + 2, mask=w_ok, other=0.0) > 0)
        tile = x_top + w[:, None] * d + cols[None, :]
        total += tl.sum(tl.load(tile, mask=w_ok[:, None] & cols_ok[None, :], other=0.0), 0)
        count += w_ok.to(acc_ty)
    divisor = tl.maximum(tl.sum(count, 0), 1.0)
    tl.store(user_row + cols, total / divisor, mask=cols_ok)
    tl.store(ws + tl.arange(0, 1), divisor + tl.zeros((1,), acc_ty))


@triton.jit
def _write_input_grads(gx_row, gres_row, at, g_x, g_r, inside, HAS_RES: tl.constexpr):
    """The op's input gradients at ``at`` in the inputs' dtype: x's and the residual's, or
    their sum when x is its own residual."""
    if HAS_RES:
        tl.store(gx_row + at, g_x.to(gx_row.dtype.element_ty), mask=inside)
        tl.store(gres_row + at, g_r.to(gres_row.dtype.element_ty), mask=inside)
    else:
        tl.store(gx_row + at, (g_x + g_r).to(gx_row.dtype.element_ty), mask=inside)


@triton.jit
def _level_backward(
    level, w_lo, w_hi, levels, b, src, res_src, mask_row, g_user_row, gx_row, gres_row, plan_ptr,
    params_ptr, fold_ptr, seed_ptr, ws, gws, part, like_ptr, d, hd, threshold, scale, eps,
    BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, FIRST: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_RES: tl.constexpr, MASK_AWARE: tl.constexpr, DROPOUT: tl.constexpr,
    HALF_DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    acc_ty = ws.dtype.element_ty
    k, s, pad, n_in, n_out, fold = _level_geometry(plan_ptr, level)
    stat_in = ws + _field(plan_ptr, level, STAT_IN)
    r_out = ws + _field(plan_ptr, level, R_OUT)
    stat_out = ws + _field(plan_ptr, level, STAT_OUT)
    gx_in = gws + _field(plan_ptr, level, GX_IN)
    gr_in = gws + _field(plan_ptr, level, GR_IN)
    gz_out = gws + _field(plan_ptr, level, GZ)
    part_w = part + _field(plan_ptr, level, PART_W)
    part_misc = part + _field(plan_ptr, level, PART_MISC)
    top = level == levels - 1
    # gradients of this level's outputs: the next level's input gradients (unused at the top)
    above = tl.minimum(level + 1, levels - 1)
    gx_out = gws + _field(plan_ptr, above, GX_IN)
    gr_out = gws + _field(plan_ptr, above, GR_IN)
    cols = tl.arange(0, BLOCK_D)
    cols_ok = cols < d
    both = cols_ok[:, None] & cols_ok[None, :]
    bias, alpha, beta, nw, _nb = _level_vectors(
        plan_ptr, params_ptr, fold_ptr, level, k, d, hd, cols, cols_ok, acc_ty
    )
    g_user = tl.load(g_user_row + cols, mask=cols_ok, other=0.0).to(acc_ty)
    user_divisor = tl.load(ws)
    overlap = k > s
    if overlap:  # several windows add to a position: start from zero (one chunk per row)
        for t in range(0, n_in, BLOCK_W):
            p = t + tl.arange(0, BLOCK_W)
            at = p[:, None] * d + cols[None, :]
            inside = (p < n_in)[:, None] & cols_ok[None, :]
            zero = tl.zeros((BLOCK_W, BLOCK_D), acc_ty)
            tl.store(gx_in + at, zero, mask=inside)
            tl.store(gr_in + at, zero, mask=inside)
        tl.debug_barrier()
    g_nw = tl.zeros((BLOCK_D,), acc_ty)
    g_nb = tl.zeros((BLOCK_D,), acc_ty)
    g_bias = tl.zeros((BLOCK_D,), acc_ty)
    g_alpha = tl.zeros((BLOCK_D,), acc_ty)
    g_beta = tl.zeros((BLOCK_D,), acc_ty)
    # pass A: gradient of each window's pre-activation, scattered to its input positions
    for t in range(w_lo, w_hi, BLOCK_W):
        w = t + tl.arange(0, BLOCK_W)
        w_ok = w < w_hi
        at = w[:, None] * d + cols[None, :]
        tile_ok = w_ok[:, None] & cols_ok[None, :]
        acc, pool, real = _window_conv(
            w, w_ok, k, s, pad, n_in, src, mask_row, stat_in, fold_ptr + fold, cols, cols_ok,
            d, like_ptr, acc_ty, BLOCK_W, BLOCK_D, FIRST, HAS_MASK, HAS_RES, MASK_AWARE,
            HALF_DOT, PRECISION,
        )  # fmt: skip
        divisor, factor = _window_factors(
            real, k, w, b, n_out, level, cols, seed_ptr, threshold, scale, acc_ty, BLOCK_W,
            BLOCK_D, MASK_AWARE, DROPOUT,
        )  # fmt: skip
        z = acc + bias[None, :]
        gelu, cdf = _gelu_parts(z)
        pooled = pool / divisor
        pooled_res = tl.load(r_out + at, mask=tile_ok, other=0.0)
        mean = tl.load(stat_out + w * 3, mask=w_ok, other=0.0)
        rstd = tl.load(stat_out + w * 3 + 1, mask=w_ok, other=0.0)
        mixed = gelu * factor + alpha * pooled + beta * pooled_res
        xhat = tl.where(cols_ok[None, :], (mixed - mean[:, None]) * rstd[:, None], 0.0)
        if top:
            g_out = tl.where(tile_ok, g_user[None, :] / user_divisor, 0.0)
            g_res_out = tl.zeros((BLOCK_W, BLOCK_D), acc_ty)
        else:
            g_out = tl.load(gx_out + at, mask=tile_ok, other=0.0)
            g_res_out = tl.load(gr_out + at, mask=tile_ok, other=0.0)
        if MASK_AWARE:
            g_out = tl.where((real > 0)[:, None], g_out, 0.0)
        g_nw += tl.sum(g_out * xhat, 0)
        g_nb += tl.sum(g_out, 0)
        g_hat = g_out * nw[None, :]
        mean_g = tl.sum(g_hat, 1) / d
        mean_gx = tl.sum(g_hat * xhat, 1) / d
        g_mixed = rstd[:, None] * (g_hat - mean_g[:, None] - xhat * mean_gx[:, None])
        g_mixed = tl.where(tile_ok, g_mixed, 0.0)
        g_alpha += tl.sum(g_mixed * pooled, 0)
        g_beta += tl.sum(g_mixed * pooled_res, 0)
        slope = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
        g_z = g_mixed * factor * slope
        g_bias += tl.sum(g_z, 0)
        tl.store(gz_out + at, g_z, mask=tile_ok)
        g_pool = alpha * g_mixed / divisor
        g_res = (beta * g_mixed + g_res_out) / divisor
        for j in range(k):
            pos = w * s + j - pad
            in_range = w_ok & (pos >= 0) & (pos < n_in)
            x_ok, r_ok, _real = _row_masks(
                pos, in_range, mask_row, stat_in, FIRST, HAS_MASK, HAS_RES, MASK_AWARE
            )
            w_t_at = fold_ptr + fold + j * d * d + cols[None, :] * d + cols[:, None]
            w_t = tl.load(w_t_at, mask=both, other=0.0)  # W_j^T
            g_x = _dot(g_z, w_t, g_pool, like_ptr, HALF_DOT, PRECISION)
            g_x = tl.where(x_ok[:, None], g_x, 0.0)
            g_r = tl.where(r_ok[:, None], g_res, 0.0)
            in_at = pos[:, None] * d + cols[None, :]
            inside = in_range[:, None] & cols_ok[None, :]
            if overlap:
                tl.debug_barrier()
                g_x += tl.load(gx_in + in_at, mask=inside, other=0.0)
                g_r += tl.load(gr_in + in_at, mask=inside, other=0.0)
                tl.store(gx_in + in_at, g_x, mask=inside)
                tl.store(gr_in + in_at, g_r, mask=inside)
            elif FIRST:  # one window per position: straight into the op's outputs
                _write_input_grads(gx_row, gres_row, in_at, g_x, g_r, inside, HAS_RES)
            else:
                tl.store(gx_in + in_at, g_x, mask=inside)
                tl.store(gr_in + in_at, g_r, mask=inside)
    tl.store(part_misc + cols, g_bias, mask=cols_ok)
    tl.store(part_misc + d + cols, g_nw, mask=cols_ok)
    tl.store(part_misc + 2 * d + cols, g_nb, mask=cols_ok)
    tl.store(part_misc + 3 * d + tl.arange(0, 1), tl.sum(g_alpha, 0) + tl.zeros((1,), acc_ty))
    tl.store(part_misc + 3 * d + 1 + tl.arange(0, 1), tl.sum(g_beta, 0) + tl.zeros((1,), acc_ty))
    tl.debug_barrier()
    # pass B: this row's share of each offset's folded weight gradient, sum_w x_j^T g_z
    for j in range(k):
        g_w = tl.zeros((BLOCK_D, BLOCK_D), acc_ty)
        for t in range(w_lo, w_hi, BLOCK_W):
            w = t + tl.arange(0, BLOCK_W)
            w_ok = w < w_hi
            pos = w * s + j - pad
            in_range = w_ok & (pos >= 0) & (pos < n_in)
            x_ok, _r_ok, _real = _row_masks(
                pos, in_range, mask_row, stat_in, FIRST, HAS_MASK, HAS_RES, MASK_AWARE
            )
            tile = src + pos[:, None] * d + cols[None, :]
            xt = tl.load(tile, mask=x_ok[:, None] & cols_ok[None, :], other=0.0).to(acc_ty)
            g_z = tl.load(
                gz_out + w[:, None] * d + cols[None, :],
                mask=w_ok[:, None] & cols_ok[None, :],
                other=0.0,
            )
            g_w = _dot(tl.trans(xt), g_z, g_w, like_ptr, HALF_DOT, PRECISION)
        tl.store(part_w + j * d * d + cols[:, None] * d + cols[None, :], g_w, mask=both)


@triton.jit(do_not_specialize=(*_VARYING, "gws_row", "part_row", "part_start"))
def _stack_backward(
    g_user_ptr, x_ptr, res_ptr, mask_ptr, params_ptr, fold_ptr, plan_ptr, seed_ptr, ws_ptr,
    gws_ptr, part_ptr, gx_ptr, gres_ptr,
    length, levels, first, last, chunk_units, d, hd, ws_row, gws_row, part_row, part_start,
    threshold, scale_hi, scale_lo, eps_hi, eps_lo,
    BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, HAS_RES: tl.constexpr,
    MASK_AWARE: tl.constexpr, DROPOUT: tl.constexpr, HALF_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (b, chunk): levels [first, last) of batch row b in reverse over the chunk's
    windows. Its parameter-gradient partials go to row b * chunks + chunk of this launch's
    partial buffer, which holds the layout's partial columns from ``part_start`` on."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    ws = ws_ptr + b * ws_row
    gws = gws_ptr + b * gws_row
    part = part_ptr + (b * chunks + chunk) * part_row - part_start
    acc_ty = ws_ptr.dtype.element_ty
    scale = tl.cast(scale_hi, acc_ty) + tl.cast(scale_lo, acc_ty)  # fp64: ~48 bits
    eps = tl.cast(eps_hi, acc_ty) + tl.cast(eps_lo, acc_ty)
    src = x_ptr + b * length * d
    if HAS_RES:
        res_src = res_ptr + b * length * d
    else:
        res_src = src
    mask_row = mask_ptr + b * length
    g_user_row = g_user_ptr + b * d
    gx_row = gx_ptr + b * length * d
    gres_row = gres_ptr + b * length * d
    for step in range(0, last - tl.maximum(first, 1)):
        level = last - 1 - step
        tl.debug_barrier()
        x_in = ws + _field(plan_ptr, level, X_IN)
        r_in = ws + _field(plan_ptr, level, R_IN)
        lo, hi = _window_range(plan_ptr, level, last, chunk, chunk_units)
        _level_backward(
            level, lo, hi, levels, b, x_in, r_in, mask_row, g_user_row, gx_row, gres_row,
            plan_ptr, params_ptr, fold_ptr, seed_ptr, ws, gws, part, x_ptr, d, hd, threshold,
            scale, eps, BLOCK_W, BLOCK_D, False, HAS_MASK, HAS_RES, MASK_AWARE, DROPOUT, HALF_DOT,
            PRECISION,
        )  # fmt: skip
    if first == 0:
        tl.debug_barrier()
        lo, hi = _window_range(plan_ptr, 0, last, chunk, chunk_units)
        _level_backward(
            0, lo, hi, levels, b, src, res_src, mask_row, g_user_row, gx_row, gres_row, plan_ptr,
            params_ptr, fold_ptr, seed_ptr, ws, gws, part, x_ptr, d, hd, threshold, scale, eps,
            BLOCK_W, BLOCK_D, True, HAS_MASK, HAS_RES, MASK_AWARE, DROPOUT, HALF_DOT, PRECISION,
        )  # fmt: skip
        if _field(plan_ptr, 0, K) > _field(plan_ptr, 0, S):  # added up in the workspace
            tl.debug_barrier()
            _copy_input_grads(
                gws + _field(plan_ptr, 0, GX_IN), gws + _field(plan_ptr, 0, GR_IN), gx_row,
                gres_row, length, d, BLOCK_W, BLOCK_D, HAS_RES,
            )  # fmt: skip


@triton.jit
def _copy_input_grads(
    gx_in, gr_in, gx_row, gres_row, length, d,
    BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, HAS_RES: tl.constexpr,
):  # fmt: skip
    """Level 0's input gradients, summed in the workspace (overlapping windows), to the op's
    outputs."""
    cols = tl.arange(0, BLOCK_D)
    cols_ok = cols < d
    for t in range(0, length, BLOCK_W):
        p = t + tl.arange(0, BLOCK_W)
        at = p[:, None] * d + cols[None, :]
        inside = (p < length)[:, None] & cols_ok[None, :]
        g_x = tl.load(gx_in + at, mask=inside, other=0.0)
        g_r = tl.load(gr_in + at, mask=inside, other=0.0)
        _write_input_grads(gx_row, gres_row, at, g_x, g_r, inside, HAS_RES)


@triton.jit
def _fold_levels(
    params_ptr, fold_ptr, plan_ptr, d, hd, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (level, j): W_j = blockdiag(conv[..., j]) @ linear^T, and (j = 0) the bias."""
    level = tl.program_id(0)
    j = tl.program_id(1)
    k = _field(plan_ptr, level, K)
    if j < k:
        acc_ty = fold_ptr.dtype.element_ty
        fold = fold_ptr + _field(plan_ptr, level, FOLD)
        base = _field(plan_ptr, level, PARAM)
        conv_b_at, lin_w_at, lin_b_at, _a, _b, _nw, _nb = _param_offsets(base, d, hd, k)
        rows = tl.arange(0, BLOCK_D)[:, None]
        cols = tl.arange(0, BLOCK_D)[None, :]
        inside = (rows < d) & (cols < d)
        # conv_j as (D_in, D_out): entry (i, o) is conv[o, i - head(o) * hd, j] within a head
        same_head = inside & (rows // hd == cols // hd)
        conv_at = base + (cols * hd + rows - (cols // hd) * hd) * k + j
        conv = tl.load(params_ptr + conv_at, mask=same_head, other=0.0).to(acc_ty)
        lin_t = tl.load(params_ptr + lin_w_at + cols * d + rows, mask=inside, other=0.0)
        lin_t = lin_t.to(acc_ty)  # (o, c) = linear[c, o]
        w_j = tl.dot(conv, lin_t, input_precision="ieee")
        tl.store(fold + j * d * d + rows * d + cols, w_j, mask=inside)
        if j == 0:
            c = tl.arange(0, BLOCK_D)
            c_ok = c < d
            conv_b = tl.load(params_ptr + conv_b_at + c, mask=c_ok, other=0.0).to(acc_ty)
            lin_b = tl.load(params_ptr + lin_b_at + c, mask=c_ok, other=0.0).to(acc_ty)
            bias = tl.sum(lin_t * conv_b[:, None], 0) + lin_b
            tl.store(fold + k * d * d + c, bias, mask=c_ok)


@triton.jit(do_not_specialize=("rows", "width"))
def _sum_partials(part_ptr, out_ptr, rows, width, BLOCK: tl.constexpr):
    """out[f] = sum over rows of part[row, f], rows in order (deterministic)."""
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = f < width
    total = tl.zeros((BLOCK,), out_ptr.dtype.element_ty)
    for r in range(0, rows):
        total += tl.load(part_ptr + r * width + f, mask=ok, other=0.0)
    tl.store(out_ptr + f, total, mask=ok)


@triton.jit
def _unfold_levels(
    params_ptr, grad_sum_ptr, plan_ptr, grad_ptr, d, hd, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (level): the packed gradient of one level from its folded gradients."""
    level = tl.program_id(0)
    acc_ty = grad_sum_ptr.dtype.element_ty
    out_ty = grad_ptr.dtype.element_ty
    k = _field(plan_ptr, level, K)
    base = _field(plan_ptr, level, PARAM)
    g_fold = grad_sum_ptr + _field(plan_ptr, level, PART_W)
    misc = grad_sum_ptr + _field(plan_ptr, level, PART_MISC)
    conv_b_at, lin_w_at, lin_b_at, alpha_at, beta_at, nw_at, nb_at = _param_offsets(base, d, hd, k)
    rows = tl.arange(0, BLOCK_D)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    inside = (rows < d) & (cols < d)
    same_head = inside & (rows // hd == cols // hd)
    c = tl.arange(0, BLOCK_D)
    c_ok = c < d
    g_bias = tl.load(misc + c, mask=c_ok, other=0.0)
    tl.store(grad_ptr + nw_at + c, tl.load(misc + d + c, mask=c_ok).to(out_ty), mask=c_ok)
    tl.store(grad_ptr + nb_at + c, tl.load(misc + 2 * d + c, mask=c_ok).to(out_ty), mask=c_ok)
    tl.store(grad_ptr + alpha_at, tl.load(misc + 3 * d).to(out_ty))
    tl.store(grad_ptr + beta_at, tl.load(misc + 3 * d + 1).to(out_ty))
    tl.store(grad_ptr + lin_b_at + c, g_bias.to(out_ty), mask=c_ok)
    lin = tl.load(params_ptr + lin_w_at + rows * d + cols, mask=inside, other=0.0).to(acc_ty)
    conv_b = tl.load(params_ptr + conv_b_at + c, mask=c_ok, other=0.0).to(acc_ty)
    g_conv_b = tl.sum(lin * g_bias[:, None], 0)  # (o,) = sum_c g_bias[c] linear[c, o]
    tl.store(grad_ptr + conv_b_at + c, g_conv_b.to(out_ty), mask=c_ok)
    g_lin_t = conv_b[:, None] * g_bias[None, :]  # (o, c): the bias term of linear's gradient
    conv_at = base + (cols * hd + rows - (cols // hd) * hd) * k  # (i, o) within a head
    for j in range(k):
        conv = tl.load(params_ptr + conv_at + j, mask=same_head, other=0.0).to(acc_ty)
        g_w = tl.load(g_fold + j * d * d + rows * d + cols, mask=inside, other=0.0)  # (i, c)
        g_lin_t = tl.dot(tl.trans(conv), g_w, g_lin_t, input_precision="ieee")
        g_conv = tl.dot(g_w, lin, input_precision="ieee")  # (i, o)
        tl.store(grad_ptr + conv_at + j, g_conv.to(out_ty), mask=same_head)
    # linear[c, o]: the tile holds (o, c)
    tl.store(grad_ptr + lin_w_at + cols * d + rows, g_lin_t.to(out_ty), mask=inside)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split(value: float) -> tuple[float, float]:
    """A double as two fp32 values whose sum is it to ~48 bits (see the module docstring)."""
    hi = _to_float32(value)
    return hi, _to_float32(value - hi)


def _to_float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


class Chunking(NamedTuple):
    """How a call splits each batch row (``chunking``): levels [0, split) run as ``chunks``
    programs per row, each owning ``chunk_units`` consecutive positions of level ``split``'s
    input and everything below them; levels [split, levels) and the readout run as one
    program per row."""

    split: int
    chunks: int
    chunk_units: int


def chunking(layout: StackLayout, batch: int, programs: int, min_positions: int) -> Chunking:
    """Split the leading kernel == stride levels (their windows tile the positions, so the
    chunks share no window) into about ``programs`` programs in all, each covering at least
    ``min_positions`` input positions; one chunk per row when that does not pay."""
    rows = layout.rows
    length = rows[0][N_IN.value] if rows else 0
    split = 0
    while split < len(rows) and rows[split][K.value] == rows[split][S.value]:
        split += 1
    wanted = min(-(-programs // max(batch, 1)), length // max(min_positions, 1))
    while split > 0 and rows[split - 1][N_OUT.value] < 2 * wanted:
        split -= 1
    if split == 0 or wanted < 2:
        return Chunking(0, 1, 0)
    units = rows[split - 1][N_OUT.value]
    chunk_units = -(-units // wanted)
    return Chunking(split, -(-units // chunk_units), chunk_units)


class _RowInputs(NamedTuple):
    """What both whole-stack kernels take besides their buffers: inputs (contiguous, with
    placeholders for absent ones), dropout and eps scalars, and constexprs with launch options."""

    x: Tensor
    residual: Tensor
    mask: Tensor
    seed: Tensor
    scalars: tuple  # threshold, scale (hi, lo), eps (hi, lo)
    flags: dict
    options: dict  # num_warps, num_stages (every launch of a call uses the same)


def _row_inputs(
    x: Tensor,
    residual: Tensor | None,
    mask: Tensor | None,
    seed: Tensor | None,
    mask_aware: bool,
    dropout: float,
    eps: float,
) -> _RowInputs:
    launch = stack_launch()
    x = x.contiguous()
    scale = 0.0 if dropout >= 1.0 else 1.0 / (1.0 - dropout)
    options = {"num_warps": launch["num_warps"], "num_stages": launch["num_stages"]}
    flags = {
        "BLOCK_W": launch["windows"],
        "BLOCK_D": max(16, triton.next_power_of_2(x.shape[2])),
        "HAS_MASK": mask is not None,
        "HAS_RES": residual is not None,
        "MASK_AWARE": mask_aware and mask is not None,
        "DROPOUT": seed is not None,
        "HALF_DOT": x.dtype in (torch.float16, torch.bfloat16),
        "PRECISION": "ieee",
        **options,
    }
    return _RowInputs(
        x,
        x if residual is None else residual.contiguous(),
        x if mask is None else mask.contiguous().view(torch.uint8),
        x if seed is None else seed,
        (int(dropout * (1 << 24)), *_split(scale), *_split(eps)),
        flags,
        options,
    )


def stack_forward(
    x: Tensor,
    residual: Tensor | None,
    mask: Tensor | None,
    params: Tensor,
    kernels: Sequence[int],
    strides: Sequence[int],
    heads: int,
    mask_aware: bool,
    seed: Tensor | None,
    dropout: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(user (B, D) in x's dtype, workspace, folded weights): the stack's forward; the last two
    are what ``stack_backward`` needs. Inputs as ``torch.ops.convrec.downscale``'s."""
    batch, length, d = x.shape
    plan, table = _plan(length, tuple(kernels), tuple(strides), d, heads, x.device)
    acc = acc_dtype(x.dtype)
    fold = torch.empty(plan.fold_size, dtype=acc, device=x.device)
    ws = torch.empty(batch, plan.forward_row, dtype=acc, device=x.device)
    user = x.new_empty(batch, d)
    hd = d // heads
    row = _row_inputs(x, residual, mask, seed, mask_aware, dropout, eps)
    block_d = row.flags["BLOCK_D"]
    grid = (len(kernels), max(kernels))
    _fold_levels[grid](params, fold, table, d, hd, BLOCK_D=block_d, **row.options)
    levels = len(kernels)
    for first, last, chunks, units, readout in _phases(plan, batch, x.device):
        _stack_forward[(batch, chunks)](
            row.x, row.residual, row.mask, params, fold, table, row.seed, ws, user, length,
            levels, first, last, units, readout, d, hd, plan.forward_row, *row.scalars,
            **row.flags,
        )  # fmt: skip
    return user, ws, fold


@functools.lru_cache(maxsize=256)
def _phases(plan: StackLayout, batch: int, device: torch.device) -> tuple[tuple[int, ...], ...]:
    """The forward launches of a call, (first level, last level + 1, chunks per row, units per
    chunk, readout): the chunked bottom levels, then the rest and the readout per row. Cached:
    the forward and the backward of a call, and every call of one shape, ask the same."""
    levels = len(plan.rows)
    split, chunks, units = chunking(plan, batch, *stack_chunks(device))
    everything = plan.rows[-1][N_OUT.value]  # one chunk owning all of the last level's outputs
    if chunks == 1:
        return ((0, levels, 1, everything, 1),)
    rest = (split, levels, 1, everything, 1) if split < levels else (levels, levels, 1, 1, 1)
    return ((0, split, chunks, units, 0), rest)


def stack_backward(
    grad_user: Tensor,
    x: Tensor,
    residual: Tensor | None,
    mask: Tensor | None,
    params: Tensor,
    fold: Tensor,
    ws: Tensor,
    kernels: Sequence[int],
    strides: Sequence[int],
    heads: int,
    mask_aware: bool,
    seed: Tensor | None,
    dropout: float,
    eps: float,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Gradients of x, of the residual (None without one) and of the packed parameters."""
    batch, length, d = x.shape
    plan, table = _plan(length, tuple(kernels), tuple(strides), d, heads, x.device)
    acc = ws.dtype
    gws = torch.empty(batch, plan.backward_row, dtype=acc, device=x.device)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grad_res = None if residual is None else torch.empty_like(grad_x)
    hd = d // heads
    row = _row_inputs(x, residual, mask, seed, mask_aware, dropout, eps)
    grad_user = grad_user.contiguous()
    summed = torch.empty(plan.partial_row, dtype=acc, device=x.device)
    for first, last, chunks, units, _ in reversed(_phases(plan, batch, x.device)):
        if first == last:  # the readout alone: nothing to differentiate
            continue
        # this launch's partial columns: its levels' (each level's follow the one before)
        start = plan.rows[first][PART_W.value]
        end = plan.rows[last][PART_W.value] if last < len(plan.rows) else plan.partial_row
        part = torch.empty(batch * chunks, end - start, dtype=acc, device=x.device)
        _stack_backward[(batch, chunks)](
            grad_user, row.x, row.residual, row.mask, params, fold, table, row.seed, ws, gws,
            part, grad_x, grad_x if grad_res is None else grad_res, length, len(kernels), first,
            last, units, d, hd, plan.forward_row, plan.backward_row, end - start, start,
            *row.scalars, **row.flags,
        )  # fmt: skip
        block = 1024
        grid = (triton.cdiv(end - start, block),)
        out = summed[start:end]
        _sum_partials[grid](part, out, batch * chunks, end - start, BLOCK=block, **row.options)
    grad_params = torch.empty_like(params)
    block_d = row.flags["BLOCK_D"]
    _unfold_levels[(len(kernels),)](
        params, summed, table, grad_params, d, hd, BLOCK_D=block_d, **row.options
    )
    return grad_x, grad_res, grad_params
