"""One writer per run folder: a lock taken before any work, stale temporaries cleaned, and no
half-made folder left behind by a run that fails before it wrote anything.

The lock is ``fcntl.flock`` on ``OUT/.lock`` (released by the kernel when the process dies, so a
killed run never leaves a stale lock). The lock file stays in the folder: deleting it would let
two writers lock two different files.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib

from convrec.training.checkpoint import temporary_names

LOCK_NAME = ".lock"
# Files a run writes with ``atomic_write``; their ``.NAME.*`` temporaries are a killed run's.
RUN_FILES = ("best.pt", "last.pt", "log.csv", "metrics.json", "summary.json", "config.json")


class RunFolderError(RuntimeError):
    """The run folder cannot be used: locked by another run, not writable, or a file."""


class RunFolderInUse(RunFolderError):
    """Another process holds the run folder's lock."""


class RunFolder:
    """``acquire()`` before loading data, ``release(failed)`` at the end (see module doc)."""

    def __init__(self, path: str | pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        self._fd: int | None = None
        self._created: list[pathlib.Path] = []  # folders this run made, innermost first
        self.wrote = False  # set once the run has written a file worth keeping

    def acquire(self) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"--out {path} is a file, not a folder")
        missing = [p for p in (path, *path.parents) if not p.exists()]
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunFolderError(f"cannot create {path}: {error.strerror}") from None
        self._created = missing
        if not os.access(path, os.W_OK | os.X_OK):
            self._remove_created()
            raise RunFolderError(f"cannot write to {path}: permission denied")
        try:
            fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            self._remove_created()
            raise RunFolderError(f"cannot write to {path}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunFolderError(f"cannot lock {path}: {error.strerror}") from None
            raise RunFolderInUse(
                f"{path} is in use by another convrec run"
                + (f" (process {owner})" if owner else "")
                + ": wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        for name in RUN_FILES:
            for stale in path.glob(temporary_names(name)):
                stale.unlink(missing_ok=True)

    def release(self, failed: bool) -> None:
        """Unlock; after a failure before anything was written, remove the folders this run
        made (only if nothing else appeared in them)."""
        if self._fd is None:
            return
        if failed and not self.wrote and self._created:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            self._remove_created()
        os.close(self._fd)
        self._fd = None

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []
