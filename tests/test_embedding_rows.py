"""``embedding_rows`` on ``convrec._C`` against its reference (``F.embedding``): the rows and the
table's gradient in float64 (to round-off; repeated ids, the padding row, tables of fewer rows
than the backward has chunks) and float32 (the tolerance rule), the same result on one thread
and two, opcheck, torch.compile, bad inputs."""

from __future__ import annotations

import pytest
import torch

from convrec.ops.embedding_rows import embedding_rows, embedding_rows_reference
from tests.helpers import compare_backends, requires_extension

pytestmark = requires_extension


def _run(backend, table, ids, padding_idx):
    """Rows and the table's gradient of a fixed random projection of them."""
    if backend == "reference":
        out = embedding_rows_reference(table, ids, padding_idx)
    else:
        out = embedding_rows(table, ids, padding_idx, backend)
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    (grad,) = torch.autograd.grad((out * projection).sum(), table)
    return out, grad


@pytest.mark.parametrize(
    ("rows", "ids_shape", "padding_idx"),
    [(5, (4, 9), 0), (3_001, (7, 50), None), (3_001, (400,), -1), (1, (5,), None)],
)
def test_float64_equals_reference(rows, ids_shape, padding_idx) -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(rows, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, rows, ids_shape, generator=g)
    ids.view(-1)[:3] = ids.view(-1)[3]  # a row picked four times
    fast = _run("cpp", table, ids, padding_idx)
    slow = _run("reference", table, ids, padding_idx)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if padding_idx is not None and (ids == padding_idx % rows).any():
        assert (fast[1][padding_idx] == 0).all()
    untouched = torch.ones(rows, dtype=torch.bool)
    untouched[ids.flatten()] = False
    assert (fast[1][untouched] == 0).all()


def test_float32_within_the_tolerance_rule() -> None:
    ids = torch.randint(0, 40, (6, 11), generator=torch.Generator().manual_seed(3))
    table = torch.randn(40, 32, dtype=torch.float64)

    def run(name, table):
        if name == "reference":
            return [embedding_rows_reference(table, ids, 0)]
        return [embedding_rows(table, ids, 0, name)]

    compare_backends(run, {"table": table}, ["table"], torch.float32, "cpp")


def test_backward_does_not_depend_on_the_thread_count() -> None:
    ids = torch.randint(0, 5_000, (20_000,), generator=torch.Generator().manual_seed(4))
    grad = torch.randn(20_000, 24)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(torch.ops.convrec.embedding_rows_backward(grad, ids, 5_000, 0))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_no_ids() -> None:
    table = torch.randn(4, 5, requires_grad=True)
    out, grad = _run("cpp", table, torch.zeros(0, 2, dtype=torch.long), 0)
    assert out.shape == (0, 2, 5) and torch.equal(grad, torch.zeros(4, 5))


def test_opcheck() -> None:
    table = torch.randn(30, 9, requires_grad=True)
    ids = torch.tensor([3, 0, 29, 3, 7])
    torch.library.opcheck(torch.ops.convrec.embedding_rows.default, (table, ids, 0))
    torch.library.opcheck(
        torch.ops.convrec.embedding_rows_backward.default, (torch.randn(5, 9), ids, 30, 0)
    )


def test_compile_fullgraph() -> None:
    table = torch.randn(30, 9, requires_grad=True)
    ids = torch.tensor([3, 0, 29, 3, 7])
    compiled = torch.compile(torch.ops.convrec.embedding_rows, fullgraph=True)
    torch.testing.assert_close(
        compiled(table, ids, 0), torch.ops.convrec.embedding_rows(table, ids, 0)
    )


def test_bad_inputs_name_the_problem() -> None:
    grad = torch.randn(3, 4)
    backward = torch.ops.convrec.embedding_rows_backward
    with pytest.raises(RuntimeError, match=r"ids\[1\] = 9 is not a row of the \(9, D\) table"):
        backward(grad, torch.tensor([0, 9, 2]), 9, -1)
    with pytest.raises(RuntimeError, match=r"ids must have shape \(3,\), got \(2,\)"):
        backward(grad, torch.tensor([0, 1]), 9, -1)
    with pytest.raises(RuntimeError, match=r"grad must be \(R, D\)"):
        backward(grad[0], torch.tensor([0, 1, 2]), 9, -1)
    with pytest.raises(ValueError, match=r"padding_idx 5 is not a row of the \(5, 4\) table"):
        embedding_rows(torch.randn(5, 4), torch.tensor([1]), 5, "cpp")
