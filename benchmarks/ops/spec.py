"""The common form of an op benchmark and the implementations it compares.

An ``OpBench`` names its benchmark shapes, builds the inputs of one shape (``make_inputs``),
counts the compulsory bytes and FLOPs of one call (``cost``, for GB/s and FLOP/s) and lists
the providers compared. A provider is one implementation of the same public op:

- "reference": the PyTorch reference in eager mode (``backend="reference"``),
- "compiled": the same reference under ``torch.compile``,
- "triton", "cpp", "cuda": the op's fast paths (``backend=<provider>``).

``make_step`` turns (provider, inputs, mode) into the zero-argument call that every driver
times, so the pytest-benchmark file and the table scripts measure the very same thing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from convrec.ops.dispatch import BACKENDS, unavailable

PROVIDERS = ("reference", "compiled", "triton", "cpp", "cuda")  # the order of report rows
MODES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
COMPILE_CACHE_LIMIT = 64  # recompilations per op: one per shape, dtype and grad mode


def float_outputs(out: object) -> list[Tensor]:
    """The floating-point tensors among an op's outputs (those a backward starts from)."""
    items = out if isinstance(out, (tuple, list)) else (out,)
    return [t for t in items if isinstance(t, Tensor) and t.is_floating_point()]


@dataclasses.dataclass
class Inputs:
    """One call of an op: ``op(*args, **kwargs, backend=...)``.

    ``grad_inputs`` and ``parameters`` are the tensors the fwd+bwd mode differentiates;
    ``parameters`` are also left out of saved-for-backward counts (they live anyway).
    ``info`` is recorded next to the timings (pytest-benchmark ``extra_info``).
    """

    args: tuple
    kwargs: dict[str, object] = dataclasses.field(default_factory=dict)
    grad_inputs: tuple[Tensor, ...] = ()
    parameters: tuple[Tensor, ...] = ()
    info: dict[str, object] = dataclasses.field(default_factory=dict)

    @property
    def wrt(self) -> tuple[Tensor, ...]:
        return (*self.grad_inputs, *self.parameters)


@dataclasses.dataclass(frozen=True)
class OpBench:
    """One op's benchmark: named shapes, input factory, cost model, providers compared."""

    name: str
    op: Callable[..., object]
    shapes: dict[str, tuple]  # name -> the op module's shape tuple
    make_inputs: Callable[[tuple, torch.device, torch.dtype], Inputs]
    providers: tuple[str, ...]
    cost: Callable[[tuple, int, str], dict[str, float]] | None = None  # (shape, bytes/elem, mode)
    tiny: tuple | None = None  # shape for Triton's CPU interpreter (checks, not timings)
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    modes: tuple[str, ...] = MODES
    gpu_only: bool = True  # False: its CPU timings mean something too (the C++ extension)
    rounds: tuple[int, int] = (20, 3)  # (timed rounds, warm-up rounds) on a real device
    outputs: Callable[[object], list[Tensor]] = float_outputs
    compile_options: dict[str, object] = dataclasses.field(default_factory=dict)


def provider_problem(bench: OpBench, provider: str, device: torch.device) -> str | None:
    """None when ``provider`` can run ``bench`` on ``device``, else why not."""
    if provider not in bench.providers:
        return f"{bench.name} has no {provider!r} provider"
    if provider in BACKENDS:  # "compiled" is the reference under torch.compile
        return unavailable(provider, device)
    return None


_compiled: dict[str, Callable[..., object]] = {}


def implementation(bench: OpBench, provider: str) -> Callable[..., object]:
    """``bench.op`` bound to the provider's backend; "compiled" is the reference under
    ``torch.compile`` (one compiled function per op, so its compilations are reused)."""
    if provider != "compiled":
        return lambda *args, **kwargs: bench.op(*args, **kwargs, backend=provider)
    if bench.name not in _compiled:
        # each shape, dtype and grad mode recompiles; past dynamo's default limit of 8 the
        # "compiled" provider would silently run eager
        limit = torch._dynamo.config.cache_size_limit
        torch._dynamo.config.cache_size_limit = max(limit, COMPILE_CACHE_LIMIT)
        eager = implementation(bench, "reference")
        _compiled[bench.name] = torch.compile(eager, **bench.compile_options)
    return _compiled[bench.name]


def make_step(bench: OpBench, provider: str, inputs: Inputs, mode: str) -> Callable[[], None]:
    """One synchronised call: "fwd" under ``no_grad``, or "fwd+bwd": the forward and the
    gradients of ``inputs.wrt`` (returned, not accumulated into ``.grad``) for fixed random
    output gradients."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    fn = implementation(bench, provider)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    grads: list[Tensor] = []

    def step() -> None:
        if mode == "fwd":
            with torch.no_grad():
                fn(*inputs.args, **inputs.kwargs)
        else:
            outputs = bench.outputs(fn(*inputs.args, **inputs.kwargs))
            if not grads:
                grads.extend(torch.randn_like(o) for o in outputs)
            torch.autograd.grad(outputs, inputs.wrt, grads)
        sync()

    return step


def forward(bench: OpBench, provider: str, inputs: Inputs) -> Callable[[], object]:
    """The provider's forward with autograd recording (for saved-for-backward counts)."""
    fn = implementation(bench, provider)
    return lambda: bench.outputs(fn(*inputs.args, **inputs.kwargs))
