"""pytest-benchmark groups of every op in ``benchmarks.registry``.

One group per "<op> <shape> <dtype> <mode>", one benchmark per provider (see
``benchmarks.ops.spec``), so pytest-benchmark prints the providers side by side; ``extra_info``
carries the op's compulsory bytes and FLOPs, from which ``python -m benchmarks.kernels`` derives
GB/s and FLOP/s. Run from the repository root::

    python -m pytest benchmarks/bench_ops.py -o python_files=bench_*.py --benchmark-only

Triton ops need a CUDA GPU and skip without one; ``CONVREC_BENCH_INTERPRET=1`` runs their first
shape, tiny, in fp32 in Triton's CPU interpreter instead (checks the benchmarks themselves;
timings meaningless). ``downscale`` also runs on CPU (the C++ extension's kernel).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.ops import INTERPRET
from benchmarks.ops.spec import DTYPES, OpBench, make_step, provider_problem
from benchmarks.registry import cases, get


def _device(bench: OpBench) -> torch.device:
    """The device the op runs on here, or a pytest skip saying why there is none."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if INTERPRET or not bench.gpu_only:
        return torch.device("cpu")
    pytest.skip("kernel benchmarks need a CUDA GPU (CONVREC_BENCH_INTERPRET=1: tiny CPU run)")


def _shape(bench: OpBench, name: str, device: torch.device) -> tuple:
    """The named shape, except in the interpreter: the tiny shape, for the first name only."""
    if device.type == "cuda" or not bench.gpu_only:
        return bench.shapes[name]
    if name != next(iter(bench.shapes)):
        pytest.skip("the interpreter runs the tiny shape once")
    return bench.tiny


@pytest.mark.parametrize(("op", "shape", "dtype", "provider", "mode"), cases())
def test_op(benchmark, op: str, shape: str, dtype: str, provider: str, mode: str) -> None:
    bench = get(op)
    device = _device(bench)
    if INTERPRET and bench.gpu_only and dtype != "fp32":
        pytest.skip("the Triton interpreter computes bf16 wrongly: fp32 only")
    problem = provider_problem(bench, provider, device)
    if problem is not None:
        pytest.skip(problem)
    size = _shape(bench, shape, device)
    inputs = bench.make_inputs(size, device, DTYPES[dtype])
    benchmark.group = f"{op} {shape} {dtype} {mode}"
    if bench.cost is not None:
        benchmark.extra_info.update(bench.cost(size, DTYPES[dtype].itemsize, mode))
    benchmark.extra_info.update(inputs.info)
    rounds, warmup = (2, 1) if INTERPRET and bench.gpu_only else bench.rounds
    step = make_step(bench, provider, inputs, mode)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)
