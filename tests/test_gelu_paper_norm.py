"""``gelu_paper_norm`` on ``convrec._C`` against its reference: values and the gradients of x,
weight and bias in float64 (to round-off) and float32 (the tolerance rule), with and without
the same dropout, gradcheck, opcheck, torch.compile, bad inputs, the faithful model in
training on both backends; CUDA when present."""

from __future__ import annotations

import pytest
import torch

from convrec import ConvRec
from convrec.ops import StackDropout, gelu_paper_norm, gelu_paper_norm_reference
from convrec.ops.dispatch import set_backend
from tests.helpers import compare_backends, randomise, requires_cuda_extension, requires_extension

pytestmark = requires_extension


def _inputs(shape, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(device, dtype)
    weight = (1 + 0.5 * torch.randn(d, generator=g, dtype=torch.float64)).to(device, dtype)
    bias = (0.3 * torch.randn(d, generator=g, dtype=torch.float64)).to(device, dtype)
    return [t.requires_grad_() for t in (x, weight, bias)]


def _run(backend, inputs, dropout, eps=1e-6):
    """Output and the gradients of x, weight and bias of a fixed random projection."""
    x, weight, bias = inputs
    if backend == "reference":
        y = gelu_paper_norm_reference(x, weight, bias, eps, dropout)
    else:
        y = gelu_paper_norm(x, weight, bias, eps, dropout, backend)
    projection = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    grads = torch.autograd.grad((y * projection.to(y.device)).sum(), inputs)
    return (y, *grads)


def _dropout(p, device="cpu"):
    return None if p == 0 else StackDropout(p, torch.tensor([12345, 678], device=device))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(37, 67), (2, 5, 3), (4, 130)])
def test_float64_equals_reference(shape, p) -> None:
    inputs = _inputs(shape)
    fast, slow = _run("cpp", inputs, _dropout(p)), _run("reference", inputs, _dropout(p))
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _compare(device: str, backend: str, dtype: torch.dtype, p: float) -> None:
    """The op on ``backend`` against its reference under the tolerance rule: y and the
    gradients of x, weight and bias (``tests.helpers.compare_backends``)."""
    x, weight, bias = (t.detach() for t in _inputs((300, 67), device=device))
    drop = _dropout(p, device)

    def run(name, x, weight, bias):
        if name == "reference":
            return [gelu_paper_norm_reference(x, weight, bias, 1e-6, drop)]
        return [gelu_paper_norm(x, weight, bias, 1e-6, drop, name)]

    inputs = {"x": x, "weight": weight, "bias": bias}
    compare_backends(run, inputs, list(inputs), dtype, backend)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_float32_within_the_tolerance_rule(p) -> None:
    _compare("cpu", "cpp", torch.float32, p)


def test_dropout_drops_what_stack_dropout_drops() -> None:
    """Where the hash drops an element of GELU(x), x gets no gradient, on both backends."""
    x, weight, bias = _inputs((50, 20))
    drop = _dropout(0.5)
    kept = drop.apply(torch.ones(50, 20, dtype=torch.float64), 0) > 0
    _, grad_x, _, _ = _run("cpp", (x, weight, bias), drop)
    assert 0.4 < kept.double().mean() < 0.6
    assert (grad_x[~kept] == 0).all() and (grad_x[kept] != 0).all()


def test_gradcheck_with_dropout() -> None:
    x, weight, bias = _inputs((6, 7))
    drop = _dropout(0.25)
    torch.autograd.gradcheck(
        lambda *t: gelu_paper_norm(*t, 1e-6, drop, "cpp"), (x, weight, bias), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("seed", [None, torch.tensor([3, 4])])
def test_opcheck(seed) -> None:
    x, weight, bias = (t.detach() for t in _inputs((9, 11), torch.float32))
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), seed, 0.1, 1e-6)
    torch.library.opcheck(torch.ops.convrec.gelu_paper_norm.default, args)
    y, stats = torch.ops.convrec.gelu_paper_norm(*args)
    backward_args = (torch.randn_like(y), x.detach(), weight.detach(), stats, seed, 0.1, 1e-6)
    torch.library.opcheck(torch.ops.convrec.gelu_paper_norm_backward.default, backward_args)


def test_compile_fullgraph() -> None:
    inputs = _inputs((8, 67), torch.float32)
    drop = _dropout(0.1)
    compiled = torch.compile(lambda *t: gelu_paper_norm(*t, 1e-6, drop, "cpp"), fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), gelu_paper_norm(*inputs, 1e-6, drop, "cpp"))


def test_bad_inputs_name_the_problem() -> None:
    x, weight, bias = _inputs((4, 6))
    with pytest.raises(ValueError, match="at least 2 channels"):
        gelu_paper_norm(x[:, :1], weight[:1], bias[:1])
    with pytest.raises(ValueError, match=r"weight and bias must have shape \(6,\)"):
        gelu_paper_norm(x, weight[:5], bias)
    with pytest.raises(RuntimeError, match="dropout_seed must have shape"):
        torch.ops.convrec.gelu_paper_norm(x, weight, bias, torch.tensor([1]), 0.1, 1e-6)
    with pytest.raises(RuntimeError, match="bias must have dtype"):
        torch.ops.convrec.gelu_paper_norm(x, weight, bias.float(), None, 0.0, 1e-6)


def test_faithful_model_trains_alike_on_both_backends() -> None:
    """``ConvRec(faithful=True)`` in training, dropout on: the extension's block, attribute
    bags (``bags_of_rows``), item rows (``embedding_rows``) and stack give the reference's
    scores and parameter gradients for the same seed (float64)."""
    attributes = [[]] + [[i % 5, 5 + i % 3] for i in range(40)]
    model = ConvRec(
        40,
        d_model=8,
        levels=((3, 3), (2, 2)),
        dropout=0.2,
        item_attributes=attributes,
        faithful=True,
        max_len=12,
        use_time=True,
    )
    randomise(model.double()).train()
    ids = torch.randint(1, 41, (3, 12), generator=torch.Generator().manual_seed(0))
    ids[0, :4] = 0  # padding
    times = torch.arange(12).repeat(3, 1) * 86400 * 17 + 1_300_000_000
    results = []
    for backend in ("cpp", "reference"):
        set_backend(model, backend)
        model.zero_grad()
        torch.manual_seed(5)
        scores = model.score(ids, ids[:, :4], times)
        (scores * torch.arange(12.0, dtype=scores.dtype).view(3, 4)).sum().backward()
        results.append((scores, [p.grad.clone() for p in model.parameters()]))
    (fast, fast_grads), (slow, slow_grads) = results
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@requires_cuda_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_cuda_within_the_tolerance_rule(dtype, p) -> None:
    _compare("cuda", "cuda", dtype, p)
