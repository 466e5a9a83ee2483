"""Backend names accepted by the encoder and models, and how they resolve per device.

"reference" is the pure-PyTorch oracle; "triton" the fused Triton kernels (CUDA, or CPU under
``TRITON_INTERPRET=1``); "cpp" / "cuda" the ``convrec._C`` extension on CPU / CUDA tensors.
"auto" picks the extension when it is built for the tensors' device, then Triton on CUDA, then
the reference, warning once when a fast path it would have used is missing. An explicitly
requested backend that cannot run raises ``RuntimeError`` with the reason.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "reference", "triton", "cpp", "cuda")


def check_backend(name: str) -> str:
    """Return ``name`` if it is a known backend, else raise ``ValueError`` listing the choices."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


@functools.cache
def extension_status() -> str | None:
    """None when ``convrec._C`` imports, else why not (cached: the answer cannot change)."""
    try:
        importlib.import_module("convrec._C")
    except ImportError as error:
        return f"the C++ extension convrec._C is not built ({error})"
    return None


@functools.cache
def triton_status(device_type: str) -> str | None:
    """None when the Triton kernels can run on ``device_type``, else why not."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return "triton is not installed"
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            f"Triton kernels need CUDA tensors (got {device_type}); on CPU set "
            "TRITON_INTERPRET=1 before importing convrec"
        )
    return None


def _reason(name: str, device: torch.device) -> str | None:
    if name == "triton":
        return triton_status(device.type)
    if name in ("cpp", "cuda"):
        wanted = "cpu" if name == "cpp" else "cuda"
        if device.type != wanted:
            return f"backend {name!r} runs on {wanted} tensors, got {device.type} tensors"
        return extension_status()
    return None


@functools.cache
def warn_once(message: str) -> None:
    """Warn once per distinct message and process (fallbacks must not flood the log)."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)


@torch.compiler.assume_constant_result
def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend that runs for tensors on ``device`` (a constant while compiling)."""
    check_backend(name)
    if name == "reference":
        return name
    if name != "auto":
        reason = _reason(name, device)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} is unavailable: {reason}")
        return name
    native = "cuda" if device.type == "cuda" else "cpp"
    if device.type in ("cpu", "cuda"):
        reason = _reason(native, device)
        if reason is None:
            return native
        if device.type == "cuda" and _reason("triton", device) is None:
            return "triton"
        warn_once(f"convrec: using the PyTorch reference on {device.type}: {reason}")
    return "reference"
