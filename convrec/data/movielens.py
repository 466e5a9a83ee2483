"""MovieLens releases: ``u.data`` + ``u.item`` (100K), ``ratings.dat`` + ``movies.dat`` (1M/10M),
``ratings.csv`` + ``movies.csv`` (latest, 20M, 25M). Every rating is an interaction, genres are
the item attributes, timestamps the context. Movies listed but never rated are ignored (the
catalogue files cover more movies than the ratings)."""

from __future__ import annotations

import csv
import pathlib

from convrec.data.dataset import DataFormatError, Event, SequenceDataset, build_dataset

_NO_GENRE = "(no genres listed)"


def _event(path: pathlib.Path, number: int, user: str, item: str, time: str) -> Event:
    try:
        int(user), int(item)
        stamp = int(float(time))
    except ValueError:
        raise DataFormatError(
            path,
            number,
            f"expected integer user, item and timestamp, got {user!r}, {item!r}, {time!r}",
        ) from None
    return Event(user, item, stamp, number)


def _split_lines(path: pathlib.Path, separator: str, columns: int, encoding: str):
    with open(path, encoding=encoding) as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            parts = text.rstrip("\r\n").split(separator)
            if len(parts) < columns:
                raise DataFormatError(
                    path,
                    number,
                    f"expected {columns} {separator!r}-separated fields, got {len(parts)}",
                )
            yield number, parts


def _ml100k(folder: pathlib.Path) -> tuple[list[Event], dict[str, list[str]], pathlib.Path]:
    ratings = folder / "u.data"
    events = [
        _event(ratings, n, p[0], p[1], p[3]) for n, p in _split_lines(ratings, "\t", 4, "latin-1")
    ]
    names = []
    genre_file = folder / "u.genre"
    if genre_file.exists():
        names = [p[0] for _, p in _split_lines(genre_file, "|", 2, "latin-1")]
    genres: dict[str, list[str]] = {}
    items = folder / "u.item"
    if items.exists():
        for number, parts in _split_lines(items, "|", 6, "latin-1"):
            flags = parts[5:]
            if any(f not in ("0", "1") for f in flags):
                raise DataFormatError(items, number, "genre flags must be 0 or 1")
            labels = names if len(names) == len(flags) else [f"genre{i}" for i in range(len(flags))]
            genres[parts[0]] = [labels[i] for i, f in enumerate(flags) if f == "1"]
    return events, genres, ratings


def _ml1m(folder: pathlib.Path) -> tuple[list[Event], dict[str, list[str]], pathlib.Path]:
    ratings = folder / "ratings.dat"
    events = [
        _event(ratings, n, p[0], p[1], p[3]) for n, p in _split_lines(ratings, "::", 4, "latin-1")
    ]
    genres: dict[str, list[str]] = {}
    movies = folder / "movies.dat"
    if movies.exists():
        for _, parts in _split_lines(movies, "::", 3, "latin-1"):
            genres[parts[0]] = [g for g in parts[2].split("|") if g and g != _NO_GENRE]
    return events, genres, ratings


def _csv_rows(path: pathlib.Path, required: tuple[str, ...]):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataFormatError(path, 1, "empty file, expected a header")
        if len(set(header)) != len(header):
            raise DataFormatError(path, 1, f"duplicate header columns in {header}")
        missing = [c for c in required if c not in header]
        if missing:
            raise DataFormatError(path, 1, f"header lacks {missing}: {header}")
        index = [header.index(c) for c in required]
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataFormatError(
                    path, reader.line_num, f"{len(row)} fields, header has {len(header)}"
                )
            yield reader.line_num, [row[i] for i in index]


def _ml_latest(folder: pathlib.Path) -> tuple[list[Event], dict[str, list[str]], pathlib.Path]:
    ratings = folder / "ratings.csv"
    fields = ("userId", "movieId", "timestamp")
    events = [_event(ratings, n, *r) for n, r in _csv_rows(ratings, fields)]
    genres: dict[str, list[str]] = {}
    movies = folder / "movies.csv"
    if movies.exists():
        for _, (movie, labels) in _csv_rows(movies, ("movieId", "genres")):
            genres[movie] = [g for g in labels.split("|") if g and g != _NO_GENRE]
    return events, genres, ratings


RELEASES = {"u.data": _ml100k, "ratings.dat": _ml1m, "ratings.csv": _ml_latest}


def load_movielens(
    folder: str | pathlib.Path, min_length: int = 3, k_core: int | None = None
) -> SequenceDataset:
    """Load a MovieLens folder (the release is recognised by its ratings file name)."""
    folder = pathlib.Path(folder)
    for ratings_name, reader in RELEASES.items():
        if (folder / ratings_name).exists():
            events, genres, source = reader(folder)
            break
    else:
        raise FileNotFoundError(f"no MovieLens ratings file ({', '.join(RELEASES)}) in {folder}")
    data = build_dataset(folder.name, events, genres, source, min_length, k_core)
    data.source.update(format="movielens", path=str(folder))
    return data
