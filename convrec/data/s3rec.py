"""S3-Rec format files.

``Name.txt`` holds ``user item item ...`` lines in chronological order, with
``Name_item2attributes.json`` beside it; optional ``Name_sample.txt`` (99 negatives per user)
and ``Name_time.txt`` (timestamps aligned with ``Name.txt``).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from convrec.data.dataset import DataFormatError, Event, SequenceDataset, build_dataset


def _int(token: str, path: pathlib.Path, line: int, what: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise DataFormatError(path, line, f"{what} {token!r} is not an integer") from None


def _read_rows(path: pathlib.Path) -> list[tuple[int, list[str]]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            tokens = text.split()
            if tokens:
                rows.append((number, tokens))
    return rows


def _read_sequences(path: pathlib.Path) -> dict[str, tuple[int, list[str]]]:
    users: dict[str, tuple[int, list[str]]] = {}
    for number, tokens in _read_rows(path):
        _int(tokens[0], path, number, "user id")
        if len(tokens) < 2:
            raise DataFormatError(path, number, f"user {tokens[0]} has no items")
        for t in tokens[1:]:
            _int(t, path, number, "item id")
        if tokens[0] in users:
            first = users[tokens[0]][0]
            raise DataFormatError(path, number, f"user {tokens[0]} already listed on line {first}")
        users[tokens[0]] = (number, tokens[1:])
    return users


def _read_times(
    path: pathlib.Path, users: dict[str, tuple[int, list[str]]]
) -> dict[str, list[int]]:
    times: dict[str, list[int]] = {}
    for number, tokens in _read_rows(path):
        user = tokens[0]
        if user not in users:
            raise DataFormatError(path, number, f"user {user} is not in the sequence file")
        values = [_int(t, path, number, "timestamp") for t in tokens[1:]]
        if len(values) != len(users[user][1]):
            raise DataFormatError(
                path,
                number,
                f"user {user} has {len(values)} timestamps for {len(users[user][1])} items",
            )
        times[user] = values
    missing = set(users) - set(times)
    if missing:
        raise DataFormatError(
            path, None, f"no timestamps for {len(missing)} users, e.g. {min(missing)}"
        )
    return times


def _read_attributes(path: pathlib.Path, items: set[str]) -> dict[str, list[str]]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataFormatError(path, error.lineno, f"invalid JSON: {error.msg}") from None
    if not isinstance(raw, dict):
        raise DataFormatError(path, 1, "expected one JSON object {item id: [attribute ids]}")
    attributes = {}
    for key, values in raw.items():
        if key not in items:
            raise DataFormatError(path, 1, f"attributes given for item {key!r}, which no user has")
        if not isinstance(values, list) or not all(isinstance(v, int) for v in values):
            raise DataFormatError(path, 1, f"item {key!r}: attributes must be a list of integers")
        attributes[key] = [str(v) for v in values]
    return attributes


def _read_negatives(
    path: pathlib.Path, data: SequenceDataset, raw_users: set[str]
) -> list[np.ndarray]:
    users, items = data.user_index(), data.item_index()
    negatives: list[np.ndarray | None] = [None] * data.num_users
    for number, tokens in _read_rows(path):
        if tokens[0] not in users:
            if tokens[0] in raw_users:
                continue  # dropped as too short
            raise DataFormatError(path, number, f"user {tokens[0]} is not in the sequence file")
        u = users[tokens[0]]
        ids = []
        for t in tokens[1:]:
            if t not in items:
                raise DataFormatError(path, number, f"negative item {t} is not in the dataset")
            ids.append(items[t])
        row = np.array(ids, dtype=np.int64)
        if np.isin(row, data.sequences[u]).any():
            bad = data.item_ids[int(row[np.isin(row, data.sequences[u])][0])]
            raise DataFormatError(
                path, number, f"negative item {bad} is in user {tokens[0]}'s history"
            )
        negatives[u] = row
    missing = [data.user_ids[u] for u, n in enumerate(negatives) if n is None]
    if missing:
        raise DataFormatError(
            path, None, f"no negatives for {len(missing)} users, e.g. {missing[0]}"
        )
    return negatives  # type: ignore[return-value]


def load_s3rec(
    prefix: str | pathlib.Path,
    timestamps: str | pathlib.Path | None = None,
    min_length: int = 3,
    k_core: int | None = None,
) -> SequenceDataset:
    """Load ``prefix.txt`` + ``prefix_item2attributes.json`` (+ ``_sample.txt``, ``_time.txt``).

    ``timestamps`` names an aligned time file elsewhere (same lines as ``prefix.txt``); by
    default ``prefix_time.txt`` is used when it exists. The file order is the chronology.
    Fixed negatives are not read after k-core filtering (their items may be gone).
    """
    prefix = pathlib.Path(prefix)
    seq_path = prefix.with_name(prefix.name + ".txt")
    if not seq_path.exists():
        raise FileNotFoundError(f"S3-Rec sequence file {seq_path} does not exist")
    users = _read_sequences(seq_path)
    time_path = (
        pathlib.Path(timestamps) if timestamps else prefix.with_name(prefix.name + "_time.txt")
    )
    times = _read_times(time_path, users) if time_path.exists() else None
    if timestamps and not time_path.exists():
        raise FileNotFoundError(f"timestamp file {time_path} does not exist")
    events = []
    for user, (_, items) in users.items():
        user_times = times[user] if times else [None] * len(items)
        events += [
            Event(user, i, t, k) for k, (i, t) in enumerate(zip(items, user_times, strict=True))
        ]
    attr_path = prefix.with_name(prefix.name + "_item2attributes.json")
    known = {e.item for e in events}
    attributes = _read_attributes(attr_path, known) if attr_path.exists() else {}
    data = build_dataset(
        prefix.name, events, attributes, seq_path, min_length, k_core, presorted=True
    )
    sample_path = prefix.with_name(prefix.name + "_sample.txt")
    if sample_path.exists() and k_core is None:
        data.sample_negatives = _read_negatives(sample_path, data, set(users))
    data.source.update(
        format="s3rec",
        path=str(prefix),
        timestamps=str(time_path) if times else None,
        negatives=str(sample_path) if data.sample_negatives is not None else None,
    )
    return data
