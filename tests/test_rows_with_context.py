"""``rows_with_context`` on ``convrec._C`` against its reference (gather, ``add_context``,
``StackDropout``): the values and the gradients of the table and the context weight in float64
(to round-off; with and without a context and dropout, repeated rows), float32 (the tolerance
rule), the reference's path for a broadcast context, opcheck, torch.compile, bad inputs."""

from __future__ import annotations

import pytest
import torch

from convrec.ops import StackDropout
from convrec.ops.rows_with_context import rows_with_context, rows_with_context_reference
from tests.helpers import compare_backends, requires_extension

pytestmark = requires_extension


def _inputs(rows=40, shape=(3, 17), width=12, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(rows, width, generator=g, dtype=dtype, requires_grad=True)
    where = torch.randint(0, rows, shape, generator=g)
    where.view(-1)[:4] = where.view(-1)[4]  # a row read five times
    context = torch.randn(*shape, 6, generator=g, dtype=dtype)
    weight = torch.randn(width, 6, generator=g, dtype=dtype, requires_grad=True)
    return table, where, context, weight


def _run(backend, table, where, context, weight, drop):
    if backend == "reference":
        out = rows_with_context_reference(table, where, context, weight, drop)
    else:
        out = rows_with_context(table, where, context, weight, drop, backend)
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    grads = torch.autograd.grad((out * projection).sum(), (table, weight), allow_unused=True)
    return out, *grads


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_context", [True, False])
def test_float64_equals_reference(p, with_context) -> None:
    table, where, context, weight = _inputs()
    context = context if with_context else None
    torch.manual_seed(3)
    drop = StackDropout.draw(p, True, table.device, "cpp")
    fast = _run("cpp", table, where, context, weight, drop)
    slow = _run("reference", table, where, context, weight, drop)
    assert (fast[2] is None) == (slow[2] is None) == (context is None)
    for a, b in zip(fast, slow, strict=True):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if p:
        assert (fast[0] == 0).float().mean() > 0.1  # the mask was applied


def test_float32_within_the_tolerance_rule() -> None:
    table, where, context, weight = _inputs()
    drop = StackDropout(0.2, torch.tensor([11, 12]), "cpp")

    def run(name, table, weight):
        args = (table, where, context.to(table.dtype), weight, drop)
        if name == "reference":
            return [rows_with_context_reference(*args)]
        return [rows_with_context(*args, name)]

    inputs = {"table": table.detach(), "weight": weight.detach()}
    compare_backends(run, inputs, ["table", "weight"], torch.float32, "cpp")


def test_a_broadcast_context_takes_the_reference() -> None:
    table, where, context, weight = _inputs()
    shared = context[:, :1]
    out = rows_with_context(table, where, shared, weight, None, "cpp")
    torch.testing.assert_close(out, rows_with_context_reference(table, where, shared, weight))


def test_opcheck_and_compile() -> None:
    table, where, context, weight = _inputs(dtype=torch.float32)
    args = (table, where.flatten(), context.flatten(0, 1), weight, torch.tensor([5, 6]), 0.25)
    torch.library.opcheck(torch.ops.convrec.rows_with_context.default, args)
    compiled = torch.compile(torch.ops.convrec.rows_with_context, fullgraph=True)
    torch.testing.assert_close(compiled(*args), torch.ops.convrec.rows_with_context(*args))


def test_bad_inputs_name_the_problem() -> None:
    table, where, context, weight = _inputs()
    op = torch.ops.convrec.rows_with_context
    flat, flat_context = where.flatten(), context.flatten(0, 1)
    with pytest.raises(RuntimeError, match=r"where\[0\] = 40 is not a row of the \(40, D\) table"):
        op(table, torch.full_like(flat, 40), flat_context, weight, None, 0.0)
    with pytest.raises(RuntimeError, match=r"context must have shape \(51, 6\)"):
        op(table, flat, flat_context[1:], weight, None, 0.0)
    with pytest.raises(RuntimeError, match=r"weight must be \(W, K\) with W = 12"):
        op(table, flat, flat_context, weight[1:], None, 0.0)
    with pytest.raises(ValueError, match="the context gets no gradient"):
        rows_with_context(table, where, context.requires_grad_(), weight, None, "cpp")
