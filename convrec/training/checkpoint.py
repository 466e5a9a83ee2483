"""Atomic checkpoint files: written to a temporary file in the same folder, fsynced, renamed.

A crash at any moment leaves either the previous file or the new one, never a torn file. The
temporary file is ``.NAME.<random>`` (a run cleans those a killed run left behind), created with
mode 0666 less the umask, as ``open`` would.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets

import torch


def temporary_names(name: str) -> str:
    """The glob pattern of ``atomic_write``'s temporary files for the file ``name``."""
    return f".{name}.*"


def _create_temporary(path: pathlib.Path) -> tuple[int, pathlib.Path]:
    """A new file beside ``path``, open for writing; its mode honours the umask."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write(path: pathlib.Path, write) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
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
