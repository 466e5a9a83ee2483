"""Per-op choice between a Triton kernel and the reference, and lazy loading of the kernels.

Op-level backends: "reference"; "triton" (raises ``RuntimeError`` with the reason when the
kernel cannot run); "auto" (Triton for CUDA tensors when it can run, else the reference, with
one warning when a CUDA call falls back). ``convrec.ops.triton`` loads on first use, so convrec
imports without Triton. The CPU interpreter needs ``TRITON_INTERPRET=1`` before Triton itself is
imported, which ``import convrec`` already does (through ``torch._dynamo``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from convrec.backends import triton_status, warn_once

OP_BACKENDS = ("reference", "triton", "auto")
MAX_KERNEL = 16  # widest window the conv kernels unroll; wider ones run on the reference


def kernels(name: str) -> ModuleType:
    """The Triton kernel module ``convrec.ops.triton.<name>`` (imported on first use)."""
    return importlib.import_module(f"convrec.ops.triton.{name}")


def kernel_size_problem(kernel: int) -> str | None:
    """Why the conv kernels cannot take this window size, or None."""
    if kernel > MAX_KERNEL:
        return f"conv kernel size {kernel} exceeds the Triton kernels' limit of {MAX_KERNEL}"
    return None


@torch.compiler.assume_constant_result
def use_triton(op: str, backend: str, device: torch.device, problem: str | None = None) -> bool:
    """Whether ``op`` runs its Triton kernel for tensors on ``device`` (a constant when compiling).

    ``problem`` names an unsupported case (shape, size); it counts like a missing Triton.
    """
    if backend not in OP_BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {OP_BACKENDS}")
    if backend == "reference":
        return False
    reason = problem or triton_status(device.type)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"{op}: backend 'triton' is unavailable: {reason}")
        return True
    if device.type != "cuda":
        return False
    if reason is not None:
        warn_once(f"convrec: {op} uses the PyTorch reference: {reason}")
        return False
    return True
