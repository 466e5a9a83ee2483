"""RecBole atomic files: tab-separated ``Name.inter`` and optional ``Name.item``, each with a
``field:type`` header (types token, token_seq, float, float_seq)."""

from __future__ import annotations

import pathlib

from convrec.data.dataset import DataFormatError, Event, SequenceDataset, build_dataset

_TYPES = ("token", "token_seq", "float", "float_seq")


def _header(path: pathlib.Path, text: str) -> dict[str, tuple[int, str]]:
    fields: dict[str, tuple[int, str]] = {}
    for column, spec in enumerate(text.rstrip("\n").split("\t")):
        name, sep, kind = spec.rpartition(":")
        if not sep or kind not in _TYPES:
            raise DataFormatError(
                path, 1, f"header field {spec!r} is not 'name:type' with type in {_TYPES}"
            )
        if name in fields:
            raise DataFormatError(path, 1, f"duplicate header field {name!r}")
        fields[name] = (column, kind)
    return fields


def _rows(path: pathlib.Path):
    """(header fields, iterator of (line number, columns)) of an atomic file."""
    f = open(path, encoding="utf-8")  # closed by the generator below
    first = f.readline()
    if not first.strip():
        f.close()
        raise DataFormatError(path, 1, "missing 'field:type' header")
    fields = _header(path, first)

    def rows():
        with f:
            for number, text in enumerate(f, start=2):
                if not text.strip():
                    continue
                columns = text.rstrip("\n").split("\t")
                if len(columns) != len(fields):
                    raise DataFormatError(
                        path, number, f"{len(columns)} columns, the header has {len(fields)}"
                    )
                yield number, columns

    return fields, rows()


def _require(path: pathlib.Path, fields: dict, name: str) -> int:
    if name not in fields:
        raise DataFormatError(path, 1, f"no {name!r} field in the header ({', '.join(fields)})")
    return fields[name][0]


def load_recbole(
    path: str | pathlib.Path,
    attribute_fields: list[str] | None = None,
    user_field: str = "user_id",
    item_field: str = "item_id",
    time_field: str = "timestamp",
    min_length: int = 3,
    k_core: int | None = None,
) -> SequenceDataset:
    """Load ``Name.inter`` (+ ``Name.item``) from a folder, a prefix or the ``.inter`` path.

    Attributes are the ``token``/``token_seq`` fields of ``.item`` (all but the item id unless
    ``attribute_fields`` names them), as ``field=value`` tokens. Interactions are sorted by
    timestamp with file order breaking ties. An ``.item`` row for an item no interaction
    mentions is an error (it usually means the two files do not belong together).
    """
    inter_path = _inter_path(pathlib.Path(path))
    fields, rows = _rows(inter_path)
    user_col = _require(inter_path, fields, user_field)
    item_col = _require(inter_path, fields, item_field)
    time_col = fields[time_field][0] if time_field in fields else None
    events = []
    for number, columns in rows:
        time = None
        if time_col is not None:
            try:
                time = int(float(columns[time_col]))
            except ValueError:
                raise DataFormatError(
                    inter_path, number, f"timestamp {columns[time_col]!r} is not a number"
                ) from None
        events.append(Event(columns[user_col], columns[item_col], time, number))
    item_path = inter_path.with_suffix(".item")
    attributes = {}
    if item_path.exists():
        attributes = _read_items(item_path, item_field, attribute_fields, {e.item for e in events})
    data = build_dataset(inter_path.stem, events, attributes, inter_path, min_length, k_core)
    data.source.update(format="recbole", path=str(inter_path))
    return data


def _inter_path(path: pathlib.Path) -> pathlib.Path:
    if path.suffix == ".inter":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.inter"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"expected exactly one .inter file in {path}, found {len(found)}"
            )
        return found[0]
    candidate = path.with_name(path.name + ".inter")
    if not candidate.exists():
        raise FileNotFoundError(f"no RecBole interaction file {candidate}")
    return candidate


def _read_items(
    path: pathlib.Path, item_field: str, attribute_fields: list[str] | None, known: set[str]
) -> dict[str, list[str]]:
    fields, rows = _rows(path)
    item_col = _require(path, fields, item_field)
    if attribute_fields is None:
        attribute_fields = [
            n for n, (_, kind) in fields.items() if n != item_field and kind.startswith("token")
        ]
    for name in attribute_fields:
        _require(path, fields, name)
    attributes: dict[str, list[str]] = {}
    for number, columns in rows:
        item = columns[item_col]
        if item not in known:
            raise DataFormatError(path, number, f"item {item!r} appears in no interaction")
        if item in attributes:
            raise DataFormatError(path, number, f"item {item!r} is listed twice")
        tokens = []
        for name in attribute_fields:
            column, kind = fields[name]
            values = columns[column].split(" ") if kind == "token_seq" else [columns[column]]
            tokens += [f"{name}={v}" for v in values if v]
        attributes[item] = tokens
    return attributes
