"""Leave-one-out cuts, padded histories, training samples and fixed negatives."""

from __future__ import annotations

import numpy as np
import pytest

from convrec.data.dataset import Event, build_dataset
from convrec.data.splits import SequenceIndex, sampled_negatives


@pytest.fixture
def data():
    events = [Event("a", str(i), 100 + i, i) for i in range(1, 7)]  # a: 1..6
    events += [Event("b", str(i), 200 + i, i) for i in (7, 8, 9)]  # b: 7, 8, 9
    return build_dataset("toy", events, {}, "toy")


def test_cuts_and_histories(data) -> None:
    index = SequenceIndex.from_dataset(data)
    assert index.split_cuts("valid").tolist() == [4, 1] and index.split_cuts("test").tolist() == [
        5,
        2,
    ]
    users = np.array([0, 1])
    ids, times = index.histories(users, index.split_cuts("test"), max_len=4)
    assert ids.tolist() == [[2, 3, 4, 5], [0, 0, 7, 8]]
    assert times.tolist() == [[102, 103, 104, 105], [0, 0, 207, 208]]
    assert index.targets(users, index.split_cuts("test")).tolist() == [6, 9]
    # seen items are the whole history, not only the last max_len
    assert index.seen(users, index.split_cuts("test")).tolist() == [
        [1, 2, 3, 4, 5],
        [7, 8, 0, 0, 0],
    ]
    with pytest.raises(ValueError, match="split"):
        index.split_cuts("train")


def test_training_samples_never_touch_valid_or_test(data) -> None:
    index = SequenceIndex.from_dataset(data)
    rng = np.random.default_rng(0)
    users, cuts = index.train_samples("all-prefixes", rng)
    assert sorted(zip(users.tolist(), cuts.tolist(), strict=True)) == [(0, 1), (0, 2), (0, 3)]
    for _ in range(20):
        users, cuts = index.train_samples("random-cut", rng)
        assert users.tolist() == [0] and 1 <= cuts[0] <= 3  # b has one training item: no pair
    with pytest.raises(ValueError, match="train sampling"):
        index.train_samples("everything", rng)


@pytest.mark.parametrize(
    ("max_len", "step"), [(1, None), (2, None), (3, None), (7, None), (7, 3), (7, 1), (8, 7)]
)
def test_all_positions_windows_cover_every_training_target_once(max_len, step) -> None:
    """Disjoint windows, or windows stepping back by ``step`` that train their last ``step``
    slots: every training target once per epoch, and before each target at least
    max_len - step + 1 of its earlier items (all of them when it has fewer)."""
    lengths = (4, 5, 9, 12, 30)
    events = [Event(str(u), str(i), None, i) for u, n in enumerate(lengths) for i in range(n)]
    data = build_dataset("toy", events, {}, "toy")
    index = SequenceIndex.from_dataset(data)
    users, cuts = index.train_samples("all-positions", np.random.default_rng(0), max_len, step)
    inputs, _ = index.histories(users, cuts, max_len)
    targets = index.window_targets(users, cuts, max_len, step)
    covered = []
    for user, row_in, row_out in zip(users, inputs, targets, strict=True):
        start = index.starts[user]
        for slot in np.flatnonzero(row_out):
            position = int(
                np.flatnonzero(index.items[start : start + index.lengths[user]] == row_out[slot])[0]
            )
            assert row_in[slot] != 0 and position >= 1
            # the target directly follows its input slot in the user's sequence
            assert index.items[start + position - 1] == row_in[slot]
            seen = int((row_in[: slot + 1] != 0).sum())
            assert seen >= min(position, max_len - (step or max_len) + 1)
            covered.append((int(user), position))
    expected = [(u, p) for u, n in enumerate(lengths) for p in range(1, n - 2)]
    assert sorted(covered) == expected  # every training target once, never valid/test


def test_negatives_avoid_history_and_are_seeded() -> None:
    events = [Event(str(u), str(i), None, i) for u in range(5) for i in range(u, u + 10)]
    data = build_dataset("toy", events, {}, "toy")
    a = sampled_negatives(data, count=3, seed=1)
    assert a.shape == (5, 3) and np.array_equal(a, sampled_negatives(data, count=3, seed=1))
    for user, row in enumerate(a):
        assert not set(row.tolist()) & set(data.sequences[user].tolist())
        assert len(set(row.tolist())) == 3
    with pytest.raises(ValueError, match="fewer than 99 negatives"):
        sampled_negatives(data, count=99)
