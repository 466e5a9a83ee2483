"""Peak memory one call adds on top of what was live before it, on CPU or GPU.

CPU: glibc's ``malloc_trim(0)`` first hands every free heap page back to the OS, so the
resident set (RSS) before the call holds only live memory and every page the call touches
shows up in it; the kernel's RSS high-water mark (VmHWM), reset through /proc/self/clear_refs,
then gives the peak. The allocator is left as it is, so the timed calls around it run as in
any training process. GPU: ``torch.cuda.max_memory_allocated`` after a reset, minus what was
allocated before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import torch


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} field")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := current RSS (Linux >= 4.0)


def _malloc_trim() -> Callable[[int], int]:
    return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim


def cpu_peak_problem() -> str | None:
    """None when the peak RSS can be measured here (Linux, glibc), else why not."""
    try:
        _malloc_trim()
        _reset_peak_rss()
        _status_bytes("VmHWM")
    except (OSError, AttributeError, RuntimeError) as error:
        return f"cannot trim the heap and reset and read the peak RSS ({error})"
    return None


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes of memory in use at the peak of ``fn()`` beyond those in use just before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _malloc_trim()(0)
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before
