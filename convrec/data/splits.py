"""Leave-one-out split, training samples from prefixes, padded batches and fixed negatives.

A sample is (user, cut): the history is the user's items before position ``cut`` and the
target is the item at ``cut``. Per user with n items: training targets are positions
1..n-3, validation targets n-2, test n-1 (the last item).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from convrec.data.dataset import SequenceDataset

SPLITS = ("valid", "test")
TRAIN_SAMPLING = ("random-cut", "all-prefixes", "all-positions")


@dataclass
class SequenceIndex:
    """All sequences concatenated, for vectorised batch building."""

    items: np.ndarray  # (total,) item ids
    times: np.ndarray | None  # (total,) unix seconds
    starts: np.ndarray  # (U,) offset of each user's first item
    lengths: np.ndarray  # (U,)

    @classmethod
    def from_dataset(cls, data: SequenceDataset) -> SequenceIndex:
        lengths = np.array([len(s) for s in data.sequences], dtype=np.int64)
        starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        times = np.concatenate(data.timestamps) if data.timestamps is not None else None
        return cls(np.concatenate(data.sequences), times, starts, lengths)

    def histories(
        self, users: np.ndarray, cuts: np.ndarray, max_len: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Left-padded (S, max_len) ids (0 = padding) of the items before each cut, and times."""
        offsets = (self.starts[users] + cuts)[:, None] + np.arange(-max_len, 0)[None, :]
        valid = offsets >= self.starts[users][:, None]
        safe = np.where(valid, offsets, 0)
        ids = np.where(valid, self.items[safe], 0)
        times = np.where(valid, self.times[safe], 0) if self.times is not None else None
        return ids, times

    def targets(self, users: np.ndarray, cuts: np.ndarray) -> np.ndarray:
        return self.items[self.starts[users] + cuts]

    def target_times(self, users: np.ndarray, cuts: np.ndarray) -> np.ndarray:
        """Unix seconds of each cut's target interaction (needs timestamps)."""
        if self.times is None:
            raise ValueError("this dataset has no timestamps")
        return self.times[self.starts[users] + cuts]

    def seen(self, users: np.ndarray, cuts: np.ndarray) -> np.ndarray:
        """Every item before each cut (not truncated to max_len), (S, max cut), 0 as filler."""
        width = max(int(cuts.max()), 1)
        offsets = (self.starts[users])[:, None] + np.arange(width)[None, :]
        valid = np.arange(width)[None, :] < cuts[:, None]
        return np.where(valid, self.items[np.where(valid, offsets, 0)], 0)

    def split_cuts(self, split: str) -> np.ndarray:
        """Target position per user for "valid" (second to last) or "test" (last)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.lengths - (2 if split == "valid" else 1)

    def train_samples(
        self,
        mode: str,
        rng: np.random.Generator,
        max_len: int = 50,
        window_step: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(users, cuts) of one epoch, shuffled.

        "random-cut": one random target per user; "all-prefixes": every training target once;
        "all-positions" (causal models): windows of ``max_len`` targets ending at each user's
        last training target and stepping back by ``window_step`` (default ``max_len``), each
        training its last ``window_step`` targets (``window_targets``), so every training
        target is predicted once per epoch, one forward pass per window.
        """
        if mode not in TRAIN_SAMPLING:
            raise ValueError(f"train sampling must be one of {TRAIN_SAMPLING}, got {mode!r}")
        last = self.lengths - 3  # last training target position
        users = np.flatnonzero(last >= 1)
        if mode == "random-cut":
            cuts = rng.integers(1, last[users] + 1)
        else:
            step = 1 if mode == "all-prefixes" else (window_step or max_len)
            counts = -(-last[users] // step)
            repeated = np.repeat(users, counts)
            first = np.cumsum(counts) - counts
            position = np.arange(len(repeated)) - np.repeat(first, counts)
            cuts = np.repeat(last[users] - (counts - 1) * step, counts) + position * step
            users = repeated
        order = rng.permutation(len(users))
        return users[order], cuts[order]

    def window_targets(
        self, users: np.ndarray, cuts: np.ndarray, max_len: int, window_step: int | None = None
    ) -> np.ndarray:
        """(S, max_len) targets of the inputs ``histories(users, cuts, max_len)``: the item
        after each input slot, 0 where the slot is padding or not trained. Slot -1 targets
        position ``cut``; with ``window_step`` only the last ``window_step`` slots train (the
        earlier targets belong to the window ending ``window_step`` positions earlier, or, in a
        user's first window, are trained here too: no earlier window holds them)."""
        inputs, _ = self.histories(users, cuts, max_len)
        targets, _ = self.histories(users, cuts + 1, max_len)
        targets = np.where(inputs != 0, targets, 0)
        if window_step is not None and window_step < max_len:
            # slot j targets position cut - (max_len - 1 - j); earlier windows own those at or
            # below cut - window_step
            position = cuts[:, None] - (max_len - 1 - np.arange(max_len))[None, :]
            targets = np.where(position > cuts[:, None] - window_step, targets, 0)
        return targets


def sampled_negatives(data: SequenceDataset, count: int = 99, seed: int = 12345) -> np.ndarray:
    """(U, count) negatives per user: the dataset's fixed file when it has one, else drawn
    uniformly without replacement from items the user never interacted with, by ``seed``."""
    if data.sample_negatives is not None:
        fixed = np.stack(data.sample_negatives)
        if fixed.shape[1] < count:
            raise ValueError(f"the negatives file has {fixed.shape[1]} per user, {count} requested")
        return fixed[:, :count]
    rng = np.random.default_rng(seed)
    out = np.zeros((data.num_users, count), dtype=np.int64)
    for user, sequence in enumerate(data.sequences):
        seen = set(sequence.tolist())
        if data.num_items - len(seen) < count:
            raise ValueError(
                f"user {data.user_ids[user]} has seen {len(seen)} of {data.num_items} items: "
                f"fewer than {count} negatives are left"
            )
        chosen: list[int] = []
        taken: set[int] = set()
        while len(chosen) < count:
            for item in rng.integers(1, data.num_items + 1, 2 * count).tolist():
                if item not in seen and item not in taken:
                    taken.add(item)
                    chosen.append(item)
                    if len(chosen) == count:
                        break
        out[user] = chosen
    return out
