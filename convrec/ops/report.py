"""What this installation can run: the lines ``convrec doctor`` prints.

Per device type: whether ``convrec._C`` has its part and for which dtypes (or why not, with what
its build recorded), whether Triton kernels can run, the whole-stack Triton dtypes, and per op
the implementation ``backend="auto"`` picks, computed from the same rules as
``convrec.ops.dispatch.resolve`` but without its fallback warnings.
"""

from __future__ import annotations

import torch

from convrec import build_status
from convrec.ops.dispatch import (
    AUTO_DEVICE,
    EXTENSION_DTYPES,
    IMPLEMENTATIONS,
    extension_status,
    triton_status,
)
from convrec.ops.downscale_triton import TRITON_DTYPES

DEVICE_TYPES = ("cpu", "cuda")


def _dtypes(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def auto_choice(op: str, device_type: str) -> tuple[str, list[str]]:
    """(what ``backend="auto"`` runs for ``op`` on ``device_type`` tensors, why each fast path
    for that device was passed over)."""
    passed = []
    for name in IMPLEMENTATIONS[op]:
        if AUTO_DEVICE[name] != device_type:
            continue
        why = triton_status(device_type) if name == "triton" else extension_status(device_type)
        if why is None:
            return name, passed
        passed.append(f"{name}: {why}")
    return "reference", passed


def backend_report() -> list[str]:
    """Lines describing the build, each fast path per device type and "auto"'s choice per op."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    recorded = build_status.read() or {}
    lines = [
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), GPU: {gpu}",
        f"convrec._C built against torch {recorded.get('torch') or 'unknown (no build record)'}",
    ]
    for device_type in DEVICE_TYPES:
        why = extension_status(device_type)
        ext = f"built ({_dtypes(EXTENSION_DTYPES[device_type])})" if why is None else why
        lines.append(f"{device_type} extension: {ext}")
        why = triton_status(device_type)
        tri = f"runs (whole stack: {_dtypes(TRITON_DTYPES[device_type])})" if why is None else why
        lines.append(f"{device_type} triton: {tri}")
    for op in IMPLEMENTATIONS:
        for device_type in DEVICE_TYPES:
            choice, passed = auto_choice(op, device_type)
            note = f" (passed over: {'; '.join(passed)})" if passed else ""
            lines.append(f"{op} on {device_type}: auto runs {choice}{note}")
    return lines
