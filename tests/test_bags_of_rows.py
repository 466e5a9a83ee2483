"""``bags_of_rows`` on ``convrec._C`` against its reference (``F.embedding_bag``): the bag sums
and the table's gradient in float64 (to round-off, several partial-table blocks included) and
float32 (the tolerance rule), empty bags and repeated attributes, the same result on one
thread and two, opcheck, torch.compile, bad inputs of the backward op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from convrec.ops.bags_of_rows import bag_entries, bags_of_rows, bags_of_rows_reference
from tests.helpers import compare_backends, requires_extension

pytestmark = requires_extension


def _catalogue(items: int, attributes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of ``items + 1`` items (0 = padding, no attributes) with 0-5 attributes each,
    repeats allowed."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 6, (items + 1,), generator=g)
    counts[0] = 0
    offsets = F.pad(counts.cumsum(0), (1, 0))
    return offsets, torch.randint(0, attributes, (int(offsets[-1]),), generator=g)


def _run(backend, rows, attr_offsets, attr_ids, table):
    """Bag sums and the table's gradient of a fixed random projection of them."""
    if backend == "reference":
        out = bags_of_rows_reference(rows, attr_offsets, attr_ids, table)
    else:
        out = bags_of_rows(rows, attr_offsets, attr_ids, table, backend)
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    (grad,) = torch.autograd.grad((out * projection).sum(), table)
    return out, grad


@pytest.mark.parametrize(("items", "distinct", "width"), [(50, 20, 7), (20_000, 9_000, 16)])
def test_float64_equals_reference(items, distinct, width) -> None:
    """9,000 bags span two partial-table blocks of the backward."""
    attr_offsets, attr_ids = _catalogue(items, 13)
    rows = torch.randperm(items + 1, generator=torch.Generator().manual_seed(2))[:distinct]
    rows = rows.sort().values
    table = torch.randn(13, width, dtype=torch.float64, requires_grad=True)
    fast = _run("cpp", rows, attr_offsets, attr_ids, table)
    slow = _run("reference", rows, attr_offsets, attr_ids, table)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    empty = (attr_offsets[rows + 1] == attr_offsets[rows]).nonzero()
    assert empty.numel() > 0 and (fast[0][empty.squeeze(1)] == 0).all()


def test_float32_within_the_tolerance_rule() -> None:
    attr_offsets, attr_ids = _catalogue(300, 11)
    rows = torch.arange(1, 301, 2)
    table = torch.randn(11, 32, dtype=torch.float64)

    def run(name, table):
        if name == "reference":
            return [bags_of_rows_reference(rows, attr_offsets, attr_ids, table)]
        return [bags_of_rows(rows, attr_offsets, attr_ids, table, name)]

    compare_backends(run, {"table": table}, ["table"], torch.float32, "cpp")


def test_backward_does_not_depend_on_the_thread_count() -> None:
    attr_offsets, attr_ids = _catalogue(30_000, 9)
    offsets, picked = bag_entries(torch.arange(1, 30_001), attr_offsets, attr_ids)
    grad = torch.randn(30_000, 24)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(torch.ops.convrec.bags_of_rows_backward(grad, offsets, picked, 9))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_no_rows() -> None:
    attr_offsets, attr_ids = _catalogue(10, 4)
    table = torch.randn(4, 5, requires_grad=True)
    out, grad = _run("cpp", torch.zeros(0, dtype=torch.long), attr_offsets, attr_ids, table)
    assert out.shape == (0, 5) and torch.equal(grad, torch.zeros(4, 5))


def test_opcheck() -> None:
    attr_offsets, attr_ids = _catalogue(40, 6)
    offsets, picked = bag_entries(torch.arange(3, 30), attr_offsets, attr_ids)
    table = torch.randn(6, 9, requires_grad=True)
    torch.library.opcheck(torch.ops.convrec.bags_of_rows.default, (table, offsets, picked))
    grad = torch.randn(27, 9)
    torch.library.opcheck(
        torch.ops.convrec.bags_of_rows_backward.default, (grad, offsets, picked, 6)
    )


def test_compile_fullgraph() -> None:
    attr_offsets, attr_ids = _catalogue(40, 6)
    offsets, picked = bag_entries(torch.arange(3, 30), attr_offsets, attr_ids)
    table = torch.randn(6, 9, requires_grad=True)
    compiled = torch.compile(torch.ops.convrec.bags_of_rows, fullgraph=True)
    torch.testing.assert_close(
        compiled(table, offsets, picked), torch.ops.convrec.bags_of_rows(table, offsets, picked)
    )


def test_bad_inputs_name_the_problem() -> None:
    grad = torch.randn(2, 3)
    picked = torch.tensor([0, 1, 2])
    backward = torch.ops.convrec.bags_of_rows_backward
    with pytest.raises(RuntimeError, match="offsets must start at 0"):
        backward(grad, torch.tensor([1, 2, 3]), picked, 4)
    with pytest.raises(RuntimeError, match=r"offsets must not decrease, but offsets\[2\] = 1"):
        backward(grad, torch.tensor([0, 2, 1]), picked[:1], 4)
    with pytest.raises(RuntimeError, match=r"picked\[2\] = 4 is not a row of the \(4, D\) table"):
        backward(grad, torch.tensor([0, 1, 3]), torch.tensor([0, 1, 4]), 4)
    with pytest.raises(RuntimeError, match=r"picked must have shape \(3,\), got \(2,\)"):
        backward(grad, torch.tensor([0, 1, 3]), picked[:2], 4)
    with pytest.raises(RuntimeError, match="grad has 2 rows for 1 bags"):
        backward(grad, torch.tensor([0, 3]), picked, 4)
