"""Bad input raises a clear ``ValueError``/``TypeError`` that names the problem."""

from __future__ import annotations

import pytest
import torch

from convrec import ConvRec, ConvRecEncoder, SASRec
from convrec.ops.item_tables import csr_from_lists


@pytest.fixture
def model():
    return ConvRec(10, d_model=8, check_inputs=True).eval()


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        (torch.ones(3, dtype=torch.long), ValueError, r"shape \(B, L\)"),
        (torch.ones(2, 3, 1, dtype=torch.long), ValueError, r"shape \(B, L\)"),
        (torch.ones(2, 3), TypeError, "int64 or int32"),
        (torch.ones(0, 5, dtype=torch.long), ValueError, "empty"),
        (torch.ones(2, 0, dtype=torch.long), ValueError, "empty"),
        ([[1, 2]], TypeError, "torch.Tensor"),
    ],
)
def test_item_id_shape_and_dtype(model, ids, error, message) -> None:
    with pytest.raises(error, match=message):
        model.encode(ids)


def test_out_of_range_id_is_named(model) -> None:
    ids = torch.tensor([[1, 2, 3], [4, 11, 5]])
    with pytest.raises(ValueError, match=r"id 11 at index \(1, 1\), outside \[0, 10\]"):
        model.encode(ids)
    with pytest.raises(ValueError, match="id -1"):
        model.encode(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="candidates holds id 12"):
        model.score(torch.tensor([[1, 2]]), torch.tensor([[3, 12]]))


def test_int32_ids_accepted(model) -> None:
    ids = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    torch.testing.assert_close(model.encode(ids), model.encode(ids.long()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 10, "heads": 3}, "not divisible by heads"),
        ({"d_model": 8, "dropout": 1.0}, "dropout"),
        ({"d_model": 8, "backend": "cuda-magic"}, "unknown backend"),
        ({"d_model": 8, "levels": [(2, 4)]}, "skip"),
        ({"d_model": 0}, "d_model"),
    ],
)
def test_encoder_construction(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        ConvRecEncoder(**kwargs)


def test_encoder_inputs() -> None:
    encoder = ConvRecEncoder(8, check_inputs=True)
    with pytest.raises(ValueError, match="d_model=8"):
        encoder(torch.randn(2, 5, 6))
    with pytest.raises(TypeError, match="floating-point"):
        encoder(torch.ones(2, 5, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(B, L, D\)"):
        encoder(torch.randn(5, 8))
    with pytest.raises(TypeError, match="bool"):
        encoder(torch.randn(2, 5, 8), torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\)"):
        encoder(torch.randn(2, 5, 8), torch.ones(2, 4, dtype=torch.bool))
    x = torch.randn(2, 5, 8)
    x[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite value nan at index \(1, 3, 2\)"):
        encoder(x)
    # the NaN check is opt-in: without it the value simply propagates
    assert torch.isnan(ConvRecEncoder(8)(x)).any()


def test_model_construction() -> None:
    with pytest.raises(ValueError, match="pass max_len"):
        ConvRec(10, faithful=True)
    with pytest.raises(ValueError, match="mask_aware"):
        ConvRec(10, faithful=True, max_len=5, mask_aware=True)
    with pytest.raises(ValueError, match="num_items"):
        ConvRec(0)
    with pytest.raises(ValueError, match="not divisible"):
        SASRec(10, d_model=10, heads=3)
    with pytest.raises(ValueError, match="attention"):
        SASRec(10, attention="flash-magic")
    with pytest.raises(ValueError, match="exceeds max_len=4"):
        SASRec(10, d_model=8, max_len=4).encode(torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="without time context"):
        ConvRec(10, d_model=8).encode(torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"= \(11, F\), got \(10, 3\)"):
        ConvRec(10, item_features=torch.randn(10, 3))


def test_attribute_index_errors() -> None:
    lists = [[], [0, 1], [2]] + [[]] * 8  # items 0..10
    offsets, ids = csr_from_lists(lists)
    with pytest.raises(ValueError, match="item 2 has attribute id 2, outside"):
        ConvRec(10, item_attributes=(offsets, ids), num_attributes=2)
    with pytest.raises(ValueError, match="expected num_items"):
        ConvRec(11, item_attributes=(offsets, ids))
    with pytest.raises(ValueError, match="decrease at item 1"):
        bad = offsets.clone()
        bad[2] = 0
        bad[1] = 2
        ConvRec(10, item_attributes=(bad, ids))
    with pytest.raises(ValueError, match="1-D int64"):
        ConvRec(10, item_attributes=(offsets.int(), ids))


def test_exclude_shapes(model) -> None:
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="exclude mask"):
        model.recommend(ids, k=2, exclude=torch.zeros(1, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="exclude holds id 20"):
        model.recommend(ids, k=2, exclude=torch.tensor([[20]]))
