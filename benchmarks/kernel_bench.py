"""Shared pieces of the kernel microbenchmarks (``bench_<op>.py``, pytest-benchmark).

Each benchmark times one op on one shape for one provider: the PyTorch reference in eager mode
("reference"), the same reference under ``torch.compile`` ("compiled") and the Triton kernel
("triton"), forward only (under ``no_grad``) or forward + backward. Groups are "<op> <shape>
<mode>", so pytest-benchmark prints the three providers side by side. ``extra_info`` carries the
compulsory bytes and FLOPs of the op, from which the GPU report derives GB/s (against the H200's
4.3 TB/s copy ceiling) and FLOP/s.

They need a CUDA GPU and skip without one; ``CONVREC_BENCH_INTERPRET=1`` runs tiny shapes in
Triton's CPU interpreter instead, to check the benchmarks themselves (timings meaningless).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor

INTERPRET = os.environ.get("CONVREC_BENCH_INTERPRET") == "1" and not torch.cuda.is_available()
if INTERPRET:  # before triton is imported (import convrec does it): keep this import first
    os.environ.setdefault("TRITON_INTERPRET", "1")

PROVIDERS = ("reference", "compiled", "triton")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench_device() -> torch.device:
    """The device the benchmarks run on, or a pytest skip saying why there is none."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if INTERPRET:
        return torch.device("cpu")
    pytest.skip("kernel benchmarks need a CUDA GPU (CONVREC_BENCH_INTERPRET=1: tiny CPU run)")


def pick_shape(cases: dict[str, tuple], case: str, tiny: tuple, device: torch.device) -> tuple:
    """The case's shape on a GPU; in the interpreter the tiny shape, for the first case only."""
    if device.type == "cuda":
        return cases[case]
    if case != next(iter(cases)):
        pytest.skip("the interpreter runs the tiny shape once")
    return tiny


def pick_dtype(name: str) -> torch.dtype:
    """The dtype to benchmark; the interpreter computes bf16 wrongly, so it only runs fp32."""
    if INTERPRET and name != "fp32":
        pytest.skip("the Triton interpreter runs fp32 only")
    return DTYPES[name]


_compiled: dict[Callable, Callable] = {}


def provider_fn(provider: str, op: Callable[..., object]) -> Callable[..., object]:
    """``op(backend=...)`` bound to the provider's backend; "compiled" compiles the reference."""
    if provider == "triton":
        return lambda *args: op(*args, backend="triton")
    reference = _compiled.get(op) if provider == "compiled" else None
    if provider == "compiled" and reference is None:
        reference = _compiled[op] = torch.compile(lambda *args: op(*args, backend="reference"))
    return reference or (lambda *args: op(*args, backend="reference"))


def _float_outputs(out: object) -> list[Tensor]:
    items = out if isinstance(out, (tuple, list)) else (out,)
    return [t for t in items if isinstance(t, Tensor) and t.is_floating_point()]


def run_benchmark(
    benchmark,
    fn: Callable[..., object],
    args: Sequence[object],
    wrt: Sequence[Tensor],
    mode: str,
    cost: dict[str, float],
) -> None:
    """Time ``fn(*args)`` with pytest-benchmark, synchronised: "fwd" under ``no_grad``, or
    "fwd+bwd": the forward and the gradients of ``wrt`` (not accumulated into ``.grad``)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    grads: list[Tensor] = []

    def step() -> None:
        if mode == "fwd":
            with torch.no_grad():
                fn(*args)
        else:
            outputs = _float_outputs(fn(*args))
            if not grads:
                grads.extend(torch.randn_like(o) for o in outputs)
            torch.autograd.grad(outputs, wrt, grads)
        sync()

    benchmark.extra_info.update(cost)
    rounds, warmup = (2, 1) if INTERPRET else (20, 3)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)


def requiring_grad(*tensors: Tensor | None) -> list[Tensor | None]:
    """Leaf copies of the float tensors with ``requires_grad`` set (None stays None)."""
    return [
        t.detach().requires_grad_() if t is not None and t.is_floating_point() else t
        for t in tensors
    ]
