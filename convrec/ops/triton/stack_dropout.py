"""Triton kernel of ``convrec.ops.stack_dropout``: the dropout factors (1 / (1 - p) or 0) of one
level, from the hash of the call's seed, in one launch (the torch form takes ~35 integer ops).

Integer math as the torch reference does it: int64 lanes holding 32-bit values, masked after
every product (each product < 2^63), so the interpreter and a GPU compute the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from convrec.ops.triton.launch import gather_blocks


@triton.jit
def _mix(x):
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


@triton.jit
def dropout_factors(seed_ptr, level, n, c, threshold, scale):
    """(rows, cols) tile: ``scale`` where level ``level`` keeps element (row ``n``, channel
    ``c``) under the seed at ``seed_ptr``, else 0 (``n``, ``c``: int64 vectors). Shared with
    the whole-stack kernels (``triton/downscale.py``), which recompute it where they need it."""
    s0 = tl.load(seed_ptr).to(tl.int64) & 0xFFFFFFFF
    s1 = tl.load(seed_ptr + 1).to(tl.int64) & 0xFFFFFFFF
    salted = (tl.cast(level, tl.int64) + 0x9E3779B9) & 0xFFFFFFFF
    level_key = _mix(s0 ^ _mix(s1 ^ _mix(salted)))
    row_hi = ((n >> 32) + 0x85EBCA6B) & 0xFFFFFFFF
    row_key = _mix(level_key ^ _mix((n & 0xFFFFFFFF) ^ _mix(row_hi)))
    h = _mix((row_key[:, None] + c[None, :] * 0x7FEB352D) & 0xFFFFFFFF)
    return tl.where((h >> 8) >= threshold, scale, 0.0)


@triton.jit
def _keep_factors_kernel(
    seed_ptr,
    out_ptr,
    level,
    rows,
    d,
    threshold,
    scale,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    factor = dropout_factors(seed_ptr, level, n, c, threshold, scale)
    inside = (n[:, None] < rows) & (c[None, :] < d)
    tl.store(out_ptr + n[:, None] * d + c[None, :], factor, mask=inside)


def keep_factors(
    seed: torch.Tensor,
    level: int,
    rows: int,
    d: int,
    threshold: int,
    scale: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(rows, d) of ``dtype``: ``scale`` where level ``level`` keeps the element, else 0."""
    out = torch.empty(rows, d, dtype=dtype, device=seed.device)
    if rows == 0 or d == 0:
        return out
    block_r, block_d = gather_blocks(rows, d)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(d, block_d))
    _keep_factors_kernel[grid](
        seed, out, level, rows, d, threshold, scale, BLOCK_R=block_r, BLOCK_D=block_d
    )
    return out
