"""Level geometry: hand-computed paddings and the schedule helper."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from convrec.schedule import (
    DEFAULT_LEVELS,
    check_levels,
    left_pad,
    level_geometry,
    out_length,
    schedule_for_length,
)


@pytest.mark.parametrize(
    ("length", "pads", "lengths"),
    [
        (50, [0, 0, 2], [25, 5, 1]),
        (35, [1, 2, 3], [18, 4, 1]),
        (1, [1, 4, 6], [1, 1, 1]),
        (70, [0, 0, 0], [35, 7, 1]),
        (71, [1, 4, 6], [36, 8, 2]),
    ],
)
def test_default_levels_hand_computed(length: int, pads: list[int], lengths: list[int]) -> None:
    geometry = level_geometry(length, DEFAULT_LEVELS)
    assert [g[0] for g in geometry] == pads
    assert [g[1] for g in geometry] == lengths


def test_shorter_than_kernel_pads_to_one_window() -> None:
    assert left_pad(3, 5, 5) == 2
    assert out_length(3, 5, 5) == 1
    # overlapping windows: the last window still ends at the newest item
    assert left_pad(6, 3, 2) == 1 and out_length(6, 3, 2) == 3


@given(st.integers(1, 500), st.integers(1, 16), st.data())
def test_windows_end_at_newest_item(length: int, kernel: int, data: st.DataObject) -> None:
    stride = data.draw(st.integers(1, kernel))
    pad = left_pad(length, kernel, stride)
    n = out_length(length, kernel, stride)
    assert 0 <= pad < max(stride, kernel)
    assert (n - 1) * stride + kernel == length + pad  # last window ends at the last input


@pytest.mark.parametrize("max_len", [1, 2, 8, 9, 50, 200, 512, 2048, 16384])
def test_schedule_covers_length(max_len: int) -> None:
    levels = schedule_for_length(max_len)
    strides = [s for _, s in levels]
    assert math.prod(strides) >= max_len
    assert all(k == s and 2 <= s <= 8 for k, s in levels)
    assert strides == sorted(strides)
    assert level_geometry(max_len, levels)[-1][1] == 1
    # fewest levels: one fewer could not cover max_len with kernels <= 8
    assert 8 ** (len(levels) - 1) < max_len or len(levels) == 1


def test_schedule_prefers_least_padding() -> None:
    assert schedule_for_length(2048) == ((4, 4), (8, 8), (8, 8), (8, 8))
    assert schedule_for_length(50, max_kernel=10) == ((5, 5), (10, 10))
    assert schedule_for_length(50, num_levels=3) == ((2, 2), (5, 5), (5, 5))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_len": 0}, "max_len"),
        ({"max_len": 10, "max_kernel": 1}, "max_kernel"),
        ({"max_len": 100, "num_levels": 2}, "cannot cover"),
        ({"max_len": 10, "num_levels": 0}, "num_levels"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        schedule_for_length(**kwargs)


@pytest.mark.parametrize(
    ("levels", "message"),
    [([], "at least one"), ([(2, 3)], "skip"), ([(0, 0)], ">= 1"), ([(2, 2, 2)], "pair")],
)
def test_check_levels_rejects(levels: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_levels(levels)


def test_left_pad_rejects_empty() -> None:
    with pytest.raises(ValueError, match="length"):
        left_pad(0, 2, 2)
