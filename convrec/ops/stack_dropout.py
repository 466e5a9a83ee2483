"""``StackDropout``: the level stack's dropout, drawn from a counter-based hash of one seed.

Every backend of ``downscale`` (and ``stream_downscale``) drops the same elements for the same
seed: element (row n, channel c) of level l is kept when a 32-bit hash of (seed, l, n, c) is at
least ``p`` of the 32-bit range. One call draws one seed (a (2,) int64 tensor of two 32-bit
words, from the default generator, on the tensors' device), so

- the ``convrec._C`` kernels recompute the keep decisions where they need them, forward and
  backward, and store no masks (no (B, L_l, D) mask tensors, no per-level RNG launches);
- the seed is a device tensor, so the draw is one launch that CUDA graphs can capture;
- backends agree in training mode: the reference applies the same masks with torch ops.

Rows n count the leading dimensions of a level's (..., D) tensor flattened, as the kernels
lay them out. The hash is Wellons' "lowbias32" integer finaliser (shifts 16, 15, 15, constants
0x21f0aaad and 0x735a2d97); ``csrc/downscale.h`` (``dropout_keeps``) is its C++ twin. Every
product below fits in int64 (a value < 2^32 times a constant < 2^31), so torch's integer ops
compute it exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from convrec.ops.dispatch import EXTENSION_DTYPES, extension_status, resolve, triton_kernels

_MASK32 = 0xFFFFFFFF
_MUL1, _MUL2 = 0x21F0AAAD, 0x735A2D97
_LEVEL_SALT, _ROW_SALT, _CHANNEL_STEP = 0x9E3779B9, 0x85EBCA6B, 0x7FEB352D
THRESHOLD_BITS = 24  # keep iff (hash >> 8) >= floor(p * 2^24)


def _mix(x: Tensor | int) -> Tensor | int:
    """lowbias32 on values in [0, 2^32) (Python ints or int64 tensors)."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 15)


def keep_threshold(p: float) -> int:
    """The 24-bit threshold below which an element is dropped."""
    return int(p * (1 << THRESHOLD_BITS))


def keep_mask(seed: Tensor, level: int, rows: int, d: int, p: float) -> Tensor:
    """Bool (rows, d): which elements of level ``level`` survive dropout with probability
    ``p`` under ``seed`` (2,) int64 (the kernels' decisions, bit for bit)."""
    s = seed.to(torch.int64) & _MASK32
    level_key = _mix(s[0] ^ _mix(s[1] ^ _mix(level + _LEVEL_SALT)))
    n = torch.arange(rows, dtype=torch.int64, device=seed.device)
    row_key = _mix(level_key ^ _mix((n & _MASK32) ^ _mix(((n >> 32) + _ROW_SALT) & _MASK32)))
    c = torch.arange(d, dtype=torch.int64, device=seed.device)
    h = _mix((row_key[:, None] + c[None, :] * _CHANNEL_STEP) & _MASK32)
    return (h >> (32 - THRESHOLD_BITS)) >= keep_threshold(p)


class StackDropout(NamedTuple):
    """Dropout with probability ``p`` for every level of one call, keyed by ``seed``;
    ``backend`` "triton" computes the factors in one Triton launch per level."""

    p: float
    seed: Tensor  # (2,) int64, each value in [0, 2^32)
    backend: str = "reference"

    @staticmethod
    def draw(
        p: float, training: bool, device: torch.device, backend: str = "reference"
    ) -> StackDropout | None:
        """A fresh seed in training with p > 0; None (no dropout) otherwise."""
        if not training or p == 0.0:
            return None
        return StackDropout(p, torch.randint(0, 1 << 32, (2,), device=device), backend)

    def scale(self) -> float:
        """The factor kept elements are multiplied by, 1 / (1 - p)."""
        return 0.0 if self.p >= 1.0 else 1.0 / (1.0 - self.p)

    def apply(self, y: Tensor, level: int) -> Tensor:
        """``y`` (..., D) with level ``level``'s dropped elements zeroed, the rest scaled.

        "cpp" / "cuda": one ``convrec._C`` pass each way (``torch.ops.convrec.stack_dropout``,
        which hashes as it multiplies and stores no mask); "triton": the factors from one
        Triton launch, then a multiply; the reference: ``keep_mask`` with torch integer ops."""
        d = y.shape[-1]
        rows = y.numel() // max(d, 1)
        backend = resolve("stack_dropout", self.backend, y.device)
        if backend in ("cpp", "cuda") and y.dtype in EXTENSION_DTYPES.get(y.device.type, ()):
            return torch.ops.convrec.stack_dropout(y, self.seed, level, self.p)
        if backend == "triton":
            threshold = keep_threshold(self.p)
            factors = _keep_factors_op(self.seed, level, rows, d, threshold, self.scale(), y.dtype)
        else:
            factors = keep_mask(self.seed, level, rows, d, self.p).to(y.dtype) * self.scale()
        return y * factors.view(y.shape)


def hashed_dropout(x: Tensor, p: float, training: bool, backend: str = "reference") -> Tensor:
    """``F.dropout(x, p, training)`` with ``StackDropout``'s masks from a fresh seed. On the
    extension it is one pass each way that stores no mask, where ``F.dropout`` on the CPU draws
    a Bernoulli variable per element (about 14 ns each) and keeps the mask."""
    drop = StackDropout.draw(p, training, x.device, backend)
    return x if drop is None else drop.apply(x, 0)


@torch.library.custom_op("convrec::stack_dropout_factors", mutates_args=())
def _keep_factors_op(
    seed: Tensor, level: int, rows: int, d: int, threshold: int, scale: float, dtype: torch.dtype
) -> Tensor:
    kernels = triton_kernels("stack_dropout")
    return kernels.keep_factors(seed, level, rows, d, threshold, scale, dtype)


@_keep_factors_op.register_fake
def _(seed, level, rows, d, threshold, scale, dtype):
    return seed.new_empty(rows, d, dtype=dtype)


def _register_extension_op() -> None:
    """Fake and autograd implementations of ``convrec::stack_dropout`` (C++ schema)."""

    @torch.library.register_fake("convrec::stack_dropout")
    def _(x, seed, level, p):
        return torch.empty_like(x)

    def setup_context(ctx, inputs, output) -> None:
        _, seed, level, p = inputs
        ctx.level, ctx.p = level, p
        ctx.save_for_backward(seed)

    def backward(ctx, grad):
        (seed,) = ctx.saved_tensors
        grad_x = torch.ops.convrec.stack_dropout(grad.contiguous(), seed, ctx.level, ctx.p)
        return grad_x, None, None, None

    torch.library.register_autograd("convrec::stack_dropout", backward, setup_context=setup_context)


if extension_status() is None:
    _register_extension_op()
