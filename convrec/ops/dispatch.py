"""Which implementation of an op runs: one backend vocabulary for every public op.

Backends: "reference" (pure PyTorch, the oracle; always available), "triton" (the kernels in
``convrec.ops.triton``: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` for tests),
"cpp" / "cuda" (the ``convrec._C`` extension on CPU / CUDA tensors), and "auto".

Each op declares its fast paths in ``IMPLEMENTATIONS``, in the order "auto" tries them; every op
also has its reference. For a tensor on a device:

- "auto" takes the first fast path that serves that device type and can run (``AUTO_DEVICE``:
  the Triton interpreter is for tests and never chosen), else the reference, warning once when
  a fast path for that device was expected but is missing;
- an explicit backend the op implements must run, or ``RuntimeError`` says why not;
- an explicit backend the op does not implement runs its reference: a backend names a fast path
  for the ops that have one ("cpp" is the extension, which only some ops have), so one name
  can be pushed down a whole model (``set_backend``).

The decision is a constant while compiling (``torch.compiler.assume_constant_result``).
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType

import torch
from torch import nn

from convrec import build_status

BACKENDS = ("auto", "reference", "triton", "cpp", "cuda")

# The fast paths of each public op, in the order "auto" tries them.
IMPLEMENTATIONS: dict[str, tuple[str, ...]] = {
    "gather_embed": ("triton", "cpp"),
    "conv_pool": ("triton",),
    "embed_conv_pool": ("triton",),
    "downscale": ("cuda", "cpp", "triton"),
    "stream_downscale": ("cuda", "cpp"),
    "stack_dropout": ("cuda", "cpp", "triton"),
    "gelu_paper_norm": ("cuda", "cpp"),
    "bags_of_rows": ("cpp",),
    "embedding_rows": ("cpp",),
    "rows_with_context": ("cpp",),
}

# The device type "auto" uses each fast path for.
AUTO_DEVICE = {"cuda": "cuda", "cpp": "cpu", "triton": "cuda"}

# The dtypes the convrec._C ops take, per device type (half types accumulate in float32).
EXTENSION_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}

MAX_KERNEL = 16  # widest window the Triton conv kernels unroll; wider ones run elsewhere


def check_backend(name: str) -> str:
    """Return ``name`` if it is a known backend, else raise ``ValueError`` listing the choices."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


@functools.cache
def extension_status(device_type: str = "cpu") -> str | None:
    """None when ``convrec._C`` imports with its part for ``device_type``, else why not, with
    what its build recorded (``convrec.build_status``; cached: the answer cannot change)."""
    recorded = build_status.read() or {}
    try:
        importlib.import_module("convrec._C")
    except ImportError as error:
        note = f"; its build said: {recorded['warning']}" if recorded.get("warning") else ""
        return f"the C++ extension convrec._C is not built ({error}){note}"
    part = recorded.get("parts", {}).get(device_type, {})
    if part.get("state", "built") != "built":
        detail = f": {part['detail']}" if part.get("detail") else ""
        return f"convrec._C was built without its {device_type} part ({part['state']}{detail})"
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


def kernel_size_problem(kernel: int) -> str | None:
    """Why the Triton conv kernels cannot take this window size, or None."""
    if kernel > MAX_KERNEL:
        return f"conv kernel size {kernel} exceeds the Triton kernels' limit of {MAX_KERNEL}"
    return None


def unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on tensors on ``device``, or None when it can."""
    if backend == "triton":
        return triton_status(device.type)
    if backend in ("cpp", "cuda"):
        wanted = "cpu" if backend == "cpp" else "cuda"
        if device.type != wanted:
            return f"backend {backend!r} runs on {wanted} tensors, got {device.type} tensors"
        return extension_status(wanted)
    return None


@functools.cache
def warn_once(message: str) -> None:
    """Warn once per distinct message and process (fallbacks must not flood the log)."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)


@torch.compiler.assume_constant_result
def resolve(op: str, backend: str, device: torch.device, triton_problem: str | None = None) -> str:
    """The implementation of ``op`` that runs for ``backend`` on tensors on ``device``.

    ``triton_problem`` names a case the Triton kernel cannot take (a window too wide); it
    counts like a missing Triton. See the module docstring for the rules.
    """
    check_backend(backend)
    fast = IMPLEMENTATIONS[op]
    if backend == "reference" or (backend != "auto" and backend not in fast):
        return "reference"
    if backend != "auto":
        reason = _reason(backend, device, triton_problem)
        if reason is not None:
            raise RuntimeError(f"{op}: backend {backend!r} is unavailable: {reason}")
        return backend
    reasons = []
    for name in fast:
        if AUTO_DEVICE[name] != device.type:
            continue
        reason = _reason(name, device, triton_problem)
        if reason is None:
            return name
        reasons.append(reason)
    if reasons:
        warn_once(f"convrec: {op} uses the PyTorch reference on {device.type}: {reasons[0]}")
    return "reference"


def _reason(backend: str, device: torch.device, triton_problem: str | None) -> str | None:
    if backend == "triton" and triton_problem is not None:
        return triton_problem
    return unavailable(backend, device)


def triton_kernels(name: str) -> ModuleType:
    """The Triton kernel module ``convrec.ops.triton.<name>``, imported on first use so convrec
    imports without Triton (the CPU interpreter needs ``TRITON_INTERPRET=1`` before Triton is
    imported, which ``import convrec`` already does through ``torch._dynamo``)."""
    return importlib.import_module(f"convrec.ops.triton.{name}")


class UsesBackend:
    """Mixin of modules whose forward passes ``self.backend`` to dispatched ops.

    ``set_backend`` sets it on every such module of a tree; a module refuses a backend it
    cannot run by raising ``ValueError`` from ``check_backend_choice``.
    """

    backend: str = "auto"

    def check_backend_choice(self, name: str) -> None:
        """Raise ``ValueError`` when this module cannot run on backend ``name``."""


def set_backend(root: nn.Module, name: str) -> None:
    """Run every op under ``root`` on backend ``name`` from now on.

    Every module is asked first, so a refused choice changes nothing. The backend is not part
    of the ``state_dict``: every backend reads the same weights.
    """
    check_backend(name)
    users = [m for m in root.modules() if isinstance(m, UsesBackend)]
    for module in users:
        module.check_backend_choice(name)
    for module in users:
        module.backend = name
