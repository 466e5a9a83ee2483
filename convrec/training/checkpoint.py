"""Atomic checkpoint files: written to a temporary file in the same folder, fsynced, renamed.

A crash at any moment leaves either the previous file or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

import torch


def atomic_write(path: pathlib.Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | pathlib.Path, payload: dict) -> None:
    atomic_write(pathlib.Path(path), lambda f: torch.save(payload, f))


def save_json(path: str | pathlib.Path, values: dict) -> None:
    text = json.dumps(values, indent=2, sort_keys=True) + "\n"
    atomic_write(pathlib.Path(path), lambda f: f.write(text.encode()))
