"""The parameters of the level stack: ``LevelParams`` (one level's tensors) and ``PackedLevels``
(a whole stack in one flat tensor).

A stack of M levels has 8·M learnable tensors. Held as separate parameters, every training
step pays one gradient accumulation per tensor and, on the extension path, per-level folding
and stacking in Python: dozens of small launches that dominate a GPU step. Packed, the stack
is one leaf: the ``convrec._C`` op reads it whole and writes one gradient, and the reference
reads per-level views of it (``unpack``), so one ``state_dict`` serves every backend.

Layout, level after level, each tensor row-major in ``LevelParams`` order:

    conv_weight (D, D/H, k) | conv_bias (D,) | linear_weight (D, D) | linear_bias (D,)
    | alpha () | beta () | norm_weight (D,) | norm_bias (D,)

``csrc/downscale.h`` (``LevelLayout``) repeats these offsets; tests pin the two together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class LevelParams(NamedTuple):
    """The learnable tensors of one level, in the order the packed layout stores them."""

    conv_weight: Tensor  # (D, D // heads, k)
    conv_bias: Tensor  # (D,)
    linear_weight: Tensor  # (D, D)
    linear_bias: Tensor  # (D,)
    alpha: Tensor  # () weight of the pooled level input
    beta: Tensor  # () weight of the pooled long residual
    norm_weight: Tensor  # (D,)
    norm_bias: Tensor  # (D,)


def level_shapes(d: int, heads: int, kernel: int) -> list[tuple[int, ...]]:
    """Shapes of one level's tensors, in ``LevelParams`` order."""
    return [(d, d // heads, kernel), (d,), (d, d), (d,), (), (), (d,), (d,)]


def level_size(d: int, heads: int, kernel: int) -> int:
    """Number of scalars one level holds."""
    return d * (d // heads) * kernel + d * d + 4 * d + 2


def packed_size(d: int, heads: int, kernels: Sequence[int]) -> int:
    """Number of scalars a stack with these window sizes holds."""
    return sum(level_size(d, heads, k) for k in kernels)


class PackedLevels(NamedTuple):
    """One flat tensor ``flat`` (P,) holding every level of a stack (module docstring)."""

    flat: Tensor
    kernels: tuple[int, ...]
    d: int
    heads: int

    def unpack(self) -> list[LevelParams]:
        """Per-level views of ``flat`` (differentiable: gradients reach ``flat``; one split, so
        the backward assembles the packed gradient in one cat, not one scatter per tensor)."""
        shapes = [s for k in self.kernels for s in level_shapes(self.d, self.heads, k)]
        pieces = self.flat.split([_numel(s) for s in shapes])
        views = [piece.view(shape) for piece, shape in zip(pieces, shapes, strict=True)]
        return [LevelParams(*views[i : i + 8]) for i in range(0, len(views), 8)]

    def tail(self, first: int) -> PackedLevels:
        """The stack from level ``first`` on (a view of ``flat``)."""
        start = packed_size(self.d, self.heads, self.kernels[:first])
        return PackedLevels(self.flat[start:], self.kernels[first:], self.d, self.heads)


def pack_levels(levels: Sequence[LevelParams], heads: int) -> PackedLevels:
    """The stack of ``levels`` packed into a new flat tensor (differentiable); ValueError names
    the first tensor whose shape does not fit D (the first conv bias's length) and ``heads``."""
    if not levels:
        raise ValueError("pack_levels needs at least one level")
    d = levels[0].conv_bias.shape[0]
    for level, p in enumerate(levels):
        shapes = level_shapes(d, heads, p.conv_weight.shape[-1] if p.conv_weight.dim() else 0)
        for name, t, shape in zip(LevelParams._fields, p, shapes, strict=True):
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"level {level} {name} must have shape {shape}, got {tuple(t.shape)}"
                )
    flat = torch.cat([t.reshape(-1) for p in levels for t in p])
    kernels = tuple(int(p.conv_weight.shape[-1]) for p in levels)
    return PackedLevels(flat, kernels, d, heads)


def check_packed(packed: PackedLevels) -> None:
    """Raise ValueError unless ``flat`` is a 1-D tensor of exactly the stack's size."""
    expected = packed_size(packed.d, packed.heads, packed.kernels)
    if packed.flat.dim() != 1 or packed.flat.numel() != expected:
        raise ValueError(
            f"packed levels need a 1-D tensor of {expected} values for D={packed.d}, "
            f"heads={packed.heads}, kernels={packed.kernels}; got {tuple(packed.flat.shape)}"
        )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
