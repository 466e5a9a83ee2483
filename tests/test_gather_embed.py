"""``gather_embed``: the reference (hand cases, a dense multi-hot re-derivation, gradients) and
the Triton kernel against it (values, gradients, deterministic mode, int64 offsets, opcheck,
torch.compile). Also the tolerance-rule helpers the other kernel tests import."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from convrec.ops import attribute_bags, gather_embed
from convrec.ops.gather_embed import rows_at
from convrec.ops.item_tables import ItemTables, csr_from_lists
from tests.helpers import (
    DEVICE,
    DEVICE_DTYPES,
    compare_backends,
    histories,
    random_catalogue,
    requires_extension,
    requires_triton,
    reserve_int32,
)


def _dense_oracle(ids, item_table, lists, attr_table, mask):
    """Independent form: multi-hot counts matrix times the attribute table, divided by counts."""
    counts = torch.zeros(len(lists), attr_table.shape[0], dtype=attr_table.dtype)
    for item, attrs in enumerate(lists):
        for a in attrs:
            counts[item, a] += 1
    per_item = counts @ attr_table / counts.sum(1, keepdim=True).clamp(min=1)
    return (item_table + per_item)[ids] * mask[..., None]


def test_hand_computed_case() -> None:
    item_table = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, 4.0]])
    attr_table = torch.tensor([[10.0, 0.0], [0.0, 10.0], [5.0, 5.0]])
    offsets, attr_ids = csr_from_lists([[], [0, 1], []])  # item 2 has no attributes
    ids = torch.tensor([[0, 1, 2]])
    out = gather_embed(ids, ItemTables(item_table, offsets, attr_ids, attr_table))
    expected = torch.tensor([[[0.0, 0.0], [6.0, 7.0], [3.0, 4.0]]])
    torch.testing.assert_close(out, expected)


def test_repeated_attribute_ids_weigh_the_mean() -> None:
    attr_table = torch.tensor([[3.0], [0.0]])
    offsets, attr_ids = csr_from_lists([[], [0, 0, 1]])
    out = attribute_bags(torch.tensor([1]), offsets, attr_ids, attr_table)
    torch.testing.assert_close(out, torch.tensor([[2.0]]))
    total = attribute_bags(torch.tensor([1]), offsets, attr_ids, attr_table, mode="sum")
    torch.testing.assert_close(total, torch.tensor([[6.0]]))


def test_matches_dense_multi_hot(attribute_lists: list[list[int]]) -> None:
    item_table = torch.randn(31, 8)
    attr_table = torch.randn(9, 8)
    offsets, attr_ids = csr_from_lists(attribute_lists)
    ids = torch.randint(0, 31, (4, 13))
    mask = (ids != 0) & (torch.rand(4, 13) > 0.2)
    out = gather_embed(ids, ItemTables(item_table, offsets, attr_ids, attr_table), mask)
    expected = _dense_oracle(ids, item_table, attribute_lists, attr_table, mask)
    torch.testing.assert_close(out, expected)
    assert (out[~mask] == 0).all()


def test_without_attributes_is_a_masked_lookup() -> None:
    table = torch.randn(6, 4)
    ids = torch.tensor([[0, 5, 2], [3, 0, 0]])
    torch.testing.assert_close(
        gather_embed(ids, ItemTables(table)), table[ids] * (ids != 0)[..., None]
    )


def test_gradcheck_float64(attribute_lists: list[list[int]]) -> None:
    offsets, attr_ids = csr_from_lists(attribute_lists)
    item_table = torch.randn(31, 3, dtype=torch.float64, requires_grad=True)
    attr_table = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 31, (2, 7))
    assert torch.autograd.gradcheck(
        lambda it, at: gather_embed(ids, ItemTables(it, offsets, attr_ids, at)),
        (item_table, attr_table),
    )


def test_partial_attribute_arguments_rejected() -> None:
    with pytest.raises(ValueError, match="together"):
        gather_embed(torch.tensor([[1]]), ItemTables(torch.randn(2, 2), attr=torch.randn(2, 2)))


# ---- Triton kernel: CPU interpreter in CI (small grids), full size and fp16/bf16 on CUDA ----


def _gather(backend, ids, item_table, attr_table, offsets, attr_ids, mask):
    if attr_table is None:
        return (gather_embed(ids, ItemTables(item_table), mask, backend),)
    tables = ItemTables(item_table, offsets, attr_ids, attr_table)
    return (gather_embed(ids, tables, mask, backend),)


GATHER_SHAPES_CPU = [(1, 1, 8), (3, 35, 12), (3, 97, 32)]
GATHER_SHAPES_CUDA = [(1, 1, 64), (3, 97, 64), (256, 512, 256)]


@requires_triton
@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@pytest.mark.parametrize("shape", range(3))
@pytest.mark.parametrize("attributes", [True, False])
def test_triton_gather_matches_reference(device, dtype, shape, attributes) -> None:
    batch, length, width = (GATHER_SHAPES_CUDA if device == "cuda" else GATHER_SHAPES_CPU)[shape]
    _compare_random_gather("triton", device, dtype, (batch, length, width), attributes)


def _compare_random_gather(backend, device, dtype, shape, attributes) -> None:
    """``backend`` against the reference on random histories (B, L) of a 50-item catalogue
    with width-D tables: values and the tables' gradients (``compare_backends``)."""
    batch, length, width = shape
    offsets, attr_ids, _ = random_catalogue(50, 11, 4, device)
    inputs = dict(
        ids=histories(batch, length, 50, device),
        item_table=torch.randn(51, width, device=device),
        attr_table=torch.randn(11, width, device=device) if attributes else None,
        offsets=offsets,
        attr_ids=attr_ids,
    )
    inputs["mask"] = inputs["ids"] != 0
    inputs = {k: v for k, v in inputs.items() if v is not None}
    wrt = ["item_table", "attr_table"] if attributes else ["item_table"]
    compare_backends(
        lambda backend, **t: _gather(backend, **{"attr_table": None, **t}),
        inputs,
        wrt,
        dtype,
        backend,
    )


@requires_triton
@pytest.mark.usefixtures("small_tiles")
def test_triton_gather_multi_tile() -> None:
    offsets, attr_ids, _ = random_catalogue(50, 11, 6, DEVICE)
    ids = histories(3, 35, 50, DEVICE)
    tables = dict(
        item_table=torch.randn(51, 40, device=DEVICE), attr_table=torch.randn(11, 40, device=DEVICE)
    )
    inputs = dict(ids=ids, offsets=offsets, attr_ids=attr_ids, mask=ids != 0, **tables)
    compare_backends(_gather, inputs, ["item_table", "attr_table"], torch.float32)


@requires_triton
def test_triton_gather_views_masks_and_id_shapes(attribute_lists) -> None:
    """Non-contiguous ids and tables, a mask that keeps padding and drops real items, 1-D ids."""
    offsets, attr_ids = (t.to(DEVICE) for t in csr_from_lists(attribute_lists))
    wide = torch.randn(31, 20, device=DEVICE)
    ids = torch.randint(0, 31, (13, 4), device=DEVICE).T  # (4, 13), non-contiguous
    mask = torch.rand(4, 13, device=DEVICE) > 0.3  # independent of the ids: keeps some 0s
    inputs = dict(
        ids=ids,
        item_table=wide[:, 2:10],  # row stride 20
        attr_table=torch.randn(8, 9, device=DEVICE).T,  # (9, 8), transposed
        offsets=offsets,
        attr_ids=attr_ids.to(torch.int32),
        mask=mask,
    )
    compare_backends(_gather, inputs, ["item_table", "attr_table"], torch.float32)
    flat = torch.tensor([3, 0, 7], device=DEVICE)
    out = gather_embed(flat, ItemTables(wide[:, :8]), flat >= 0, "triton")
    torch.testing.assert_close(out, wide[flat, :8])


@requires_triton
def test_triton_gather_deterministic_mode_is_bit_identical() -> None:
    device = DEVICE
    offsets, attr_ids, _ = random_catalogue(20, 7, 5, device)
    ids = histories(3, 40, 20, device)  # few items, many repeats: many rows collide
    item_table = torch.randn(21, 16, device=device, requires_grad=True)
    attr_table = torch.randn(7, 16, device=device, requires_grad=True)
    grad = torch.randn(3, 40, 16, device=device)

    def grads() -> tuple[Tensor, ...]:
        tables = ItemTables(item_table, offsets, attr_ids, attr_table)
        x = gather_embed(ids, tables, backend="triton")
        return torch.autograd.grad(x, (item_table, attr_table), grad)

    atomic = grads()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b, c in zip(first, second, atomic, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@requires_triton
def test_triton_gather_int64_offsets_past_2_31() -> None:
    """A CSR whose offsets all exceed 2^31: the ids live at the end of an 8 GiB int32 array that
    is only reserved (untouched pages cost no memory), so int32 offset arithmetic would read
    elsewhere. The reference runs on the same CSR shifted to start at 0."""
    base = 2**31 + 3
    offsets, attr_ids, _ = random_catalogue(30, 9, 3, DEVICE)
    huge = reserve_int32(base + attr_ids.numel())
    huge[base:] = attr_ids.to(torch.int32)
    item_table = torch.randn(31, 8, device=DEVICE, requires_grad=True)
    attr_table = torch.randn(9, 8, device=DEVICE, requires_grad=True)
    ids = histories(3, 20, 30, DEVICE)
    grad = torch.randn(3, 20, 8, device=DEVICE)
    out = gather_embed(
        ids, ItemTables(item_table, offsets + base, huge, attr_table), backend="triton"
    )
    expected = gather_embed(ids, ItemTables(item_table, offsets, huge[base:], attr_table))
    torch.testing.assert_close(out, expected)
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            got = torch.autograd.grad(out, (item_table, attr_table), grad, retain_graph=True)
        finally:
            torch.use_deterministic_algorithms(False)
        want = torch.autograd.grad(expected, (item_table, attr_table), grad, retain_graph=True)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)


@requires_triton
def test_triton_gather_rejects_bad_inputs() -> None:
    table = torch.randn(5, 4, device=DEVICE)
    one = torch.tensor([[1]], device=DEVICE)
    with pytest.raises(ValueError, match="holds id 7"):
        gather_embed(torch.tensor([[1, 7]], device=DEVICE), ItemTables(table), backend="triton")
    with pytest.raises(ValueError, match="attr_offsets must be int64 of shape"):
        offsets = torch.zeros(5, dtype=torch.int64, device=DEVICE)
        gather_embed(one, ItemTables(table, offsets, offsets, table), backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        gather_embed(one, ItemTables(table), backend="cudnn")


@requires_triton
def test_triton_gather_opcheck(attribute_lists) -> None:
    offsets, attr_ids = (t.to(DEVICE) for t in csr_from_lists(attribute_lists))
    ids = torch.randint(0, 31, (2, 9), device=DEVICE)
    item_table = torch.randn(31, 8, device=DEVICE, requires_grad=True)
    attr_table = torch.randn(9, 8, device=DEVICE, requires_grad=True)
    op = torch.ops.convrec.gather_embed.default
    torch.library.opcheck(op, (ids, item_table, offsets, attr_ids, attr_table, ids != 0))
    torch.library.opcheck(op, (ids, item_table, None, None, None, ids != 0))


@pytest.mark.slow
@requires_triton
def test_triton_gather_compiles_fullgraph(attribute_lists) -> None:
    offsets, attr_ids = (t.to(DEVICE) for t in csr_from_lists(attribute_lists))
    item_table = torch.randn(31, 8, device=DEVICE, requires_grad=True)
    attr_table = torch.randn(9, 8, device=DEVICE, requires_grad=True)

    def loss(ids: Tensor) -> Tensor:
        tables = ItemTables(item_table, offsets, attr_ids, attr_table)
        x = gather_embed(ids, tables, backend="triton")
        return x.square().sum()

    ids = torch.randint(0, 31, (3, 11), device=DEVICE)
    eager = torch.autograd.grad(loss(ids), (item_table, attr_table))
    compiled = torch.autograd.grad(
        torch.compile(loss, fullgraph=True)(ids), (item_table, attr_table)
    )
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e)


def test_rows_at_is_indexing_with_its_gradient() -> None:
    """``rows_at(table, where)`` is ``table[where]``, repeated rows' gradients summed."""
    table = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    where = torch.tensor([[3, 3, 0], [8, 3, 1]])
    grad = torch.randn(2, 3, 5, dtype=torch.float64)
    got = rows_at(table, where)
    (got_grad,) = torch.autograd.grad(got, table, grad)
    expected = table[where]
    (expected_grad,) = torch.autograd.grad(expected, table, grad)
    assert torch.equal(got, expected)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-15, atol=1e-15)
    assert got_grad[3].abs().sum() > 0 and got_grad[2].abs().sum() == 0


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("attributes", [True, False])
def test_cpp_gather_matches_reference(dtype, attributes) -> None:
    """The extension's gather (``embedding_rows`` + ``bags_of_rows``) against the reference:
    values and both tables' gradients, repeated ids, items without attributes, padding."""
    _compare_random_gather("cpp", "cpu", dtype, (3, 35, 12), attributes)


@requires_extension
def test_cpp_gather_views_masks_and_id_shapes(attribute_lists) -> None:
    """Non-contiguous ids and tables, int32 attribute ids, a mask that keeps padding and drops
    real items, 1-D ids: the same rows as the reference."""
    offsets, attr_ids = csr_from_lists(attribute_lists)
    wide = torch.randn(31, 20, dtype=torch.float64)
    ids = torch.randint(0, 31, (13, 4)).T
    mask = torch.rand(4, 13) > 0.3
    inputs = dict(
        ids=ids,
        item_table=wide[:, 2:10],
        attr_table=torch.randn(8, 9, dtype=torch.float64).T,
        offsets=offsets,
        attr_ids=attr_ids.to(torch.int32),
        mask=mask,
    )
    compare_backends(_gather, inputs, ["item_table", "attr_table"], torch.float64, "cpp")
    flat = torch.tensor([3, 0, 7])
    torch.testing.assert_close(
        gather_embed(flat, ItemTables(wide[:, :8]), None, "cpp"),
        wide[flat, :8] * (flat != 0)[:, None],
    )


@requires_extension
def test_cpp_gather_rejects_bad_ids() -> None:
    table = torch.randn(3, 4)
    with pytest.raises(ValueError, match="item_ids"):
        gather_embed(torch.tensor([[1, 7]]), ItemTables(table), backend="cpp")
    with pytest.raises(ValueError, match="item_ids"):
        gather_embed(torch.tensor([[1, -2]]), ItemTables(table), backend="cpp")
