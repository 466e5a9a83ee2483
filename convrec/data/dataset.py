"""The one in-memory dataset type every loader produces, and the shared build step.

Loaders only parse; ``build_dataset`` does the rest the same way for every format: stable
chronological sort, k-core filtering, dropping too-short users, id maps (0 = padding) and the
item -> attributes CSR index.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from convrec.ops.item_tables import csr_from_lists


class DataFormatError(ValueError):
    """A data file is malformed; the message names the file and line."""

    def __init__(self, path: object, line: int | None, problem: str) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")
        self.where = (path, line, problem)

    def __reduce__(self):
        """Picklable, so an error in a worker process reaches the parent intact."""
        return type(self), self.where


@dataclass
class Event:
    """One raw interaction: original ids, optional time, and its position in the source file."""

    user: str
    item: str
    time: int | None
    order: int


@dataclass
class SequenceDataset:
    """Users' chronological item sequences with internal ids 1..N (0 = padding).

    ``item_ids[i]`` / ``user_ids[u]`` map internal indices back to the original ids;
    ``attr_offsets`` (N + 2,) and ``attr_ids`` form the item -> attribute CSR index (attribute
    indices 0..A-1, names in ``attribute_names``). ``sample_negatives`` holds, per user index,
    a fixed list of negative items when the source ships one (S3-Rec's ``Name_sample.txt``).
    """

    name: str
    sequences: list[np.ndarray]
    timestamps: list[np.ndarray] | None
    user_ids: list[str]
    item_ids: list[str]
    attr_offsets: np.ndarray
    attr_ids: np.ndarray
    attribute_names: list[str]
    sample_negatives: list[np.ndarray] | None = None
    dropped_users: int = 0
    source: dict = field(default_factory=dict)

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_names)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def item_index(self) -> dict[str, int]:
        """Original item id -> internal id."""
        return {orig: i for i, orig in enumerate(self.item_ids) if i > 0}

    def user_index(self) -> dict[str, int]:
        return {orig: u for u, orig in enumerate(self.user_ids)}

    def attribute_lists(self) -> list[np.ndarray]:
        return [
            self.attr_ids[self.attr_offsets[i] : self.attr_offsets[i + 1]]
            for i in range(self.num_items + 1)
        ]

    def stats(self) -> dict[str, float]:
        lengths = np.array([len(s) for s in self.sequences])
        attrs = np.diff(self.attr_offsets)[1:]
        return {
            "users": self.num_users,
            "items": self.num_items,
            "interactions": self.num_interactions,
            "attributes": self.num_attributes,
            "length_min": int(lengths.min()),
            "length_median": float(np.median(lengths)),
            "length_mean": float(lengths.mean()),
            "length_max": int(lengths.max()),
            "attributes_per_item": float(attrs.mean()) if len(attrs) else 0.0,
            "has_timestamps": self.timestamps is not None,
            "dropped_users": self.dropped_users,
        }


def _sorted_ids(values: Iterable[str]) -> list[str]:
    """Unique ids in numeric order when they are all integers (keeps 1..N as 1..N), else text."""
    unique = set(values)
    try:
        return sorted(unique, key=int)
    except ValueError:
        return sorted(unique)


def _k_core(users: dict[str, list[Event]], k: int) -> dict[str, list[Event]]:
    """Iteratively drop users and items with fewer than ``k`` interactions."""
    while True:
        item_counts: dict[str, int] = {}
        for events in users.values():
            for e in events:
                item_counts[e.item] = item_counts.get(e.item, 0) + 1
        kept = {u: [e for e in events if item_counts[e.item] >= k] for u, events in users.items()}
        kept = {u: events for u, events in kept.items() if len(events) >= k}
        if sum(map(len, kept.values())) == sum(map(len, users.values())):
            return kept
        users = kept


def build_dataset(
    name: str,
    events: Sequence[Event],
    item_attributes: dict[str, list[str]],
    source_path: object,
    min_length: int = 3,
    k_core: int | None = None,
    presorted: bool = False,
) -> SequenceDataset:
    """Group raw events into chronological per-user sequences and index everything.

    Events are sorted per user by (time, file order) with a stable sort, unless ``presorted``
    (the file order is the chronological order, as in S3-Rec files). Users with fewer than
    ``min_length`` items are dropped with a warning; an error is raised when nobody is left.
    ``item_attributes`` maps original item ids to attribute tokens; items absent from the
    events are ignored here (the loaders decide whether that is an error).
    """
    if not events:
        raise DataFormatError(source_path, None, "no interactions found (empty dataset)")
    users: dict[str, list[Event]] = {}
    for e in events:
        users.setdefault(e.user, []).append(e)
    has_time = all(e.time is not None for e in events)
    if not presorted:
        for u, user_events in users.items():
            key = (lambda e: (e.time, e.order)) if has_time else (lambda e: e.order)
            users[u] = sorted(user_events, key=key)
    if k_core is not None and k_core > 1:
        users = _k_core(users, k_core)
    kept = {u: ev for u, ev in users.items() if len(ev) >= min_length}
    dropped = len(users) - len(kept)
    if not kept:
        raise DataFormatError(
            source_path,
            None,
            f"no user has at least {min_length} interactions after filtering "
            f"({len(users)} users before); nothing to train on",
        )
    if dropped:
        warnings.warn(
            f"{name}: dropped {dropped} of {len(users)} users with fewer than {min_length} "
            "interactions",
            stacklevel=3,
        )
    user_ids = _sorted_ids(kept)
    item_ids = ["", *_sorted_ids(e.item for ev in kept.values() for e in ev)]
    item_index = {orig: i for i, orig in enumerate(item_ids) if i > 0}
    sequences = [np.array([item_index[e.item] for e in kept[u]], dtype=np.int64) for u in user_ids]
    timestamps = (
        [np.array([e.time for e in kept[u]], dtype=np.int64) for u in user_ids]
        if has_time
        else None
    )
    attribute_names = _sorted_ids(a for i in item_ids[1:] for a in item_attributes.get(i, ()))
    attr_index = {a: j for j, a in enumerate(attribute_names)}
    per_item = [[attr_index[a] for a in item_attributes.get(i, ())] for i in item_ids]
    per_item[0] = []
    offsets, attr_ids = (t.numpy() for t in csr_from_lists(per_item))
    return SequenceDataset(
        name=name,
        sequences=sequences,
        timestamps=timestamps,
        user_ids=user_ids,
        item_ids=item_ids,
        attr_offsets=offsets,
        attr_ids=attr_ids,
        attribute_names=attribute_names,
        dropped_users=dropped,
        source={"path": str(source_path)},
    )
