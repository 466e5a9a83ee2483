"""A ``ConvRecEncoder`` step on the extension and on Triton is a handful of dispatched ops
whatever the number of levels (issue: a GPU step was 150-200 launches, one per small op).
Counted with a ``TorchDispatchMode``, which sees every op the Python side dispatches (not the
ATen calls the extension makes inside its kernels, nor what a custom op's implementation
runs: the Triton launches and their buffer allocations)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from convrec import ConvRecEncoder
from convrec.ops.dispatch import extension_status, triton_status
from tests.helpers import requires_extension

MAX_OPS = 10


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def step_ops(encoder: ConvRecEncoder, length: int, masked: bool, device: str = "cpu") -> list[str]:
    """Ops dispatched by one forward and backward of ``encoder`` on a (4, length, 16) batch."""
    x = torch.randn(4, length, 16, device=device, requires_grad=True)
    starts = torch.tensor([[0], [3], [length // 2], [length - 1]])
    mask = (torch.arange(length) >= starts).to(device)
    grad = torch.randn(4, 16, device=device)
    with CountOps() as counter:
        encoder(x, mask if masked else None).backward(grad)
    return counter.ops


BACKENDS = [
    pytest.param("cpp", marks=requires_extension),
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            triton_status("cuda" if torch.cuda.is_available() else "cpu") is not None,
            reason="Triton cannot run here",
        ),
    ),
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            extension_status("cuda") is not None or not torch.cuda.is_available(),
            reason="needs CUDA and the CUDA part of convrec._C",
        ),
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("mask_aware", [False, True])
def test_extension_step_is_a_handful_of_ops(backend: str, training: bool, mask_aware: bool) -> None:
    on_gpu = backend == "cuda" or (backend == "triton" and torch.cuda.is_available())
    device = "cuda" if on_gpu else "cpu"
    op = "convrec.downscale_triton" if backend == "triton" else "convrec.downscale"
    counts = set()
    schedules = (((7, 7),), ((2, 2), (3, 2), (5, 5)), ((4, 4),) * 6)
    for length, levels in zip((50, 50, 4096), schedules, strict=True):
        encoder = ConvRecEncoder(16, levels, heads=2, mask_aware=mask_aware, backend=backend)
        encoder.to(device).train(training)
        ops = step_ops(encoder, length, masked=True, device=device)
        assert len(ops) <= MAX_OPS, ops
        assert ops.count(f"{op}.default") == 1
        assert ops.count(f"{op}_backward.default") == 1
        counts.add(len(ops))
    assert len(counts) == 1  # independent of the number of levels and of L


@requires_extension
def test_one_gradient_for_the_whole_stack() -> None:
    encoder = ConvRecEncoder(16, ((2, 2), (3, 3), (4, 4)), backend="cpp")
    step_ops(encoder, 24, masked=False)
    assert [name for name, _ in encoder.named_parameters()] == ["stack_weights"]
    assert encoder.stack_weights.grad is not None and encoder.stack_weights.grad.abs().sum() > 0
