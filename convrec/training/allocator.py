"""Keep freed large blocks in the process: what ``convrec train`` asks of glibc's allocator.

glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
unmaps it when freed, so a tensor of that size allocated every step is page-faulted in again
every step (about 1 ms per MiB on this project's CPU). A training step allocates several: the
gradients of the item table and of the level stack's input, the full-softmax loss's chunk of
scores. When the loss still built the whole score matrix (73 MB on Beauty), one streaming step
in four went to page faults (``benchmarks/results/streaming_cpu/training_epochs.md``).

``keep_freed_memory`` makes the heap serve every block and never trims it below 2 GiB of free
space, so the training loop reuses its own memory. The price: the process keeps its peak
memory until it exits. It changes allocation only, never a result, and is a no-op where the C
library has no ``mallopt`` (not glibc) or on other systems.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Ask glibc to serve every allocation from its heap and keep freed memory; True when it
    accepted both settings (False: not Linux, not glibc, or refused)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
