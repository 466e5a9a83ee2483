"""``gather_embed`` reference: hand cases, a dense multi-hot re-derivation, gradients."""

from __future__ import annotations

import pytest
import torch

from convrec.item_encoder import csr_from_lists
from convrec.ops import attribute_bags, gather_embed


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
    out = gather_embed(ids, item_table, offsets, attr_ids, attr_table)
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
    out = gather_embed(ids, item_table, offsets, attr_ids, attr_table, mask)
    expected = _dense_oracle(ids, item_table, attribute_lists, attr_table, mask)
    torch.testing.assert_close(out, expected)
    assert (out[~mask] == 0).all()


def test_without_attributes_is_a_masked_lookup() -> None:
    table = torch.randn(6, 4)
    ids = torch.tensor([[0, 5, 2], [3, 0, 0]])
    torch.testing.assert_close(gather_embed(ids, table), table[ids] * (ids != 0)[..., None])


def test_gradcheck_float64(attribute_lists: list[list[int]]) -> None:
    offsets, attr_ids = csr_from_lists(attribute_lists)
    item_table = torch.randn(31, 3, dtype=torch.float64, requires_grad=True)
    attr_table = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 31, (2, 7))
    assert torch.autograd.gradcheck(
        lambda it, at: gather_embed(ids, it, offsets, attr_ids, at), (item_table, attr_table)
    )


def test_partial_attribute_arguments_rejected() -> None:
    with pytest.raises(ValueError, match="together"):
        gather_embed(torch.tensor([[1]]), torch.randn(2, 2), attr_table=torch.randn(2, 2))
