"""One entry point for every supported source: ``load_dataset(path, format="auto")``."""

from __future__ import annotations

import pathlib

from convrec.data.dataset import SequenceDataset
from convrec.data.movielens import RELEASES, load_movielens
from convrec.data.recbole import load_recbole
from convrec.data.s3rec import load_s3rec
from convrec.data.synthetic import synthetic_dataset

FORMATS = ("auto", "s3rec", "recbole", "movielens", "synthetic")


def check_data_path(path: str | pathlib.Path) -> None:
    """Raise ``FileNotFoundError`` (one line) when nothing a loader could read is at ``path``:
    neither the path itself nor an S3-Rec prefix (``PATH.txt``) or RecBole one (``PATH.inter``).
    Given an S3-Rec sequence file (``Beauty.txt``), it names the prefix to pass instead."""
    if str(path) == "synthetic":
        return
    p = pathlib.Path(path)
    if p.suffix == ".txt" and p.is_file() and not p.with_name(p.name + ".txt").is_file():
        raise FileNotFoundError(
            f"{path} is an S3-Rec sequence file: pass its prefix, {p.with_suffix('')}"
        )
    if not (p.exists() or any(p.with_name(p.name + s).is_file() for s in (".txt", ".inter"))):
        raise FileNotFoundError(f"dataset {path} does not exist")


def detect_format(path: str | pathlib.Path) -> str:
    """Name the format of ``path`` from the files present, or raise naming what was expected."""
    if str(path) == "synthetic":
        return "synthetic"
    check_data_path(path)
    p = pathlib.Path(path)
    if p.with_name(p.name + ".txt").is_file():
        return "s3rec"
    if p.suffix == ".inter" or p.with_name(p.name + ".inter").is_file():
        return "recbole"
    if p.is_dir():
        if any(p.glob("*.inter")):
            return "recbole"
        if any((p / name).is_file() for name in RELEASES):
            return "movielens"
    raise ValueError(
        f"cannot tell the format of {path!s}: expected an S3-Rec prefix (PATH.txt), a RecBole "
        f".inter file or folder, a MovieLens folder ({', '.join(RELEASES)}), or 'synthetic'"
    )


def load_dataset(
    path: str | pathlib.Path,
    format: str = "auto",
    min_length: int = 3,
    k_core: int | None = None,
    timestamps: str | pathlib.Path | None = None,
    attribute_fields: list[str] | None = None,
    synthetic_options: dict | None = None,
) -> SequenceDataset:
    """Load any supported dataset. ``timestamps`` applies to S3-Rec (an aligned time file),
    ``attribute_fields`` to RecBole, ``synthetic_options`` to the generator."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if format in ("s3rec", "movielens", "recbole"):
        check_data_path(path)
    if format == "auto":
        format = detect_format(path)
    if format == "synthetic":
        return synthetic_dataset(**(synthetic_options or {}))
    if format == "s3rec":
        return load_s3rec(path, timestamps, min_length, k_core)
    if format == "recbole":
        return load_recbole(path, attribute_fields, min_length=min_length, k_core=k_core)
    return load_movielens(path, min_length, k_core)
