"""Level geometry: left padding per level and schedules that cover a target history length.

Windows are anchored at the newest position: each level prepends just enough zeros that the
last window ends exactly at the last (newest) input, so padding always goes to the old end.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

Level = tuple[int, int]  # (kernel, stride)

DEFAULT_LEVELS: tuple[Level, ...] = ((2, 2), (5, 5), (7, 7))


def left_pad(length: int, kernel: int, stride: int) -> int:
    """Zeros to prepend to a length-``length`` sequence so strided windows end at its last item.

    When the sequence is shorter than the kernel, it is padded up to exactly one window.
    """
    if length < 1:
        raise ValueError(f"sequence length must be >= 1, got {length}")
    if length < kernel:
        return kernel - length
    return (-(length - kernel)) % stride


def out_length(length: int, kernel: int, stride: int) -> int:
    """Number of windows (output positions) of one level for an input of ``length``."""
    return (length + left_pad(length, kernel, stride) - kernel) // stride + 1


def level_geometry(length: int, levels: Sequence[Level]) -> list[tuple[int, int]]:
    """``[(left_pad, out_length), ...]`` for each level applied in turn to ``length`` inputs."""
    geometry = []
    for kernel, stride in levels:
        pad = left_pad(length, kernel, stride)
        length = (length + pad - kernel) // stride + 1
        geometry.append((pad, length))
    return geometry


def check_levels(levels: Sequence[Sequence[int]]) -> tuple[Level, ...]:
    """Validate a level schedule and return it as a tuple of ``(kernel, stride)`` pairs."""
    if len(levels) == 0:
        raise ValueError("levels must hold at least one (kernel, stride) pair")
    checked = []
    for i, level in enumerate(levels):
        if len(level) != 2:
            raise ValueError(f"level {i} must be a (kernel, stride) pair, got {tuple(level)!r}")
        kernel, stride = (int(v) for v in level)
        if kernel < 1 or stride < 1:
            raise ValueError(f"level {i}: kernel and stride must be >= 1, got ({kernel}, {stride})")
        if stride > kernel:
            raise ValueError(
                f"level {i}: stride {stride} > kernel {kernel} would skip input positions"
            )
        checked.append((kernel, stride))
    return tuple(checked)


def schedule_for_length(
    max_len: int, max_kernel: int = 8, num_levels: int | None = None
) -> tuple[Level, ...]:
    """Non-overlapping levels (kernel = stride) whose stride product covers ``max_len``.

    Uses the fewest levels with kernels <= ``max_kernel`` (or exactly ``num_levels``), then the
    smallest stride product >= ``max_len`` (least padding), then the most even strides; strides
    grow with depth, as in the paper's (2, 5, 7). A product >= max_len means a history of
    ``max_len`` items ends in a single position before the position mean.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if max_kernel < 2:
        raise ValueError(f"max_kernel must be >= 2, got {max_kernel}")
    if num_levels is None:
        num_levels = max(1, math.ceil(math.log(max_len) / math.log(max_kernel) - 1e-12))
    elif num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    if max_kernel**num_levels < max_len:
        raise ValueError(
            f"{num_levels} levels with kernels <= {max_kernel} cannot cover {max_len} positions"
        )
    best: tuple[int, int, tuple[int, ...]] | None = None
    for strides in itertools.combinations_with_replacement(range(2, max_kernel + 1), num_levels):
        product = math.prod(strides)
        if product < max_len:
            continue
        key = (product, strides[-1] - strides[0], strides)
        if best is None or key < best:
            best = key
    assert best is not None  # guaranteed by the coverage check above
    return tuple((s, s) for s in best[2])
