"""Wall-clock timing of a benchmark's calls, shared by the benchmarks that time eager calls."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def time_ms(run: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Wall-clock milliseconds of ``repeats`` calls after two warm-up calls (on CUDA each call
    waits for its kernels)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run(), run()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times
