"""What a benchmark ran on: processor, threads, GPU, library versions and memory sizes.

Every result row carries this, so numbers from different machines are never mixed up.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` reports."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(device: str) -> dict[str, str]:
    """CPU model, torch threads / logical CPUs, GPU name (when ``device`` is cuda), versions."""
    return {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cpu": cpu_model(),
        "threads": f"{torch.get_num_threads()}/{os.cpu_count()}",
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "",
    }


def _meminfo(field: str) -> int:
    """A /proc/meminfo field in bytes."""
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/meminfo has no {field} field")


def device_memory_bytes(device: str) -> int:
    """Total memory of the device: the GPU's, or the machine's RAM."""
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return _meminfo("MemTotal")


def available_ram_bytes() -> int:
    """RAM the kernel could hand out now without swapping (MemAvailable)."""
    return _meminfo("MemAvailable")
