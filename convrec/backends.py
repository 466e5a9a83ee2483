"""Backend names accepted by the encoder and models, and how "auto" resolves."""

from __future__ import annotations

import torch

# Fast paths register here as they land (Triton kernels, the convrec._C extension).
AVAILABLE = ("auto", "reference")


def check_backend(name: str) -> str:
    """Return ``name`` if it is a known backend, else raise ``ValueError`` listing the choices."""
    if name not in AVAILABLE:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(AVAILABLE)}")
    return name


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend that runs for tensors on ``device``; "auto" picks the best one built."""
    check_backend(name)
    return "reference"
