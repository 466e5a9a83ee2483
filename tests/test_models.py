"""``ConvRec`` and ``SASRec``: shared interface, attention variants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from convrec import ConvRec, SASRec
from convrec.ops.item_tables import csr_from_lists
from convrec.ops.stack_dropout import hashed_dropout
from convrec.time_context import CONTEXT_DIM, time_context


def _histories(batch: int = 4, length: int = 12, num_items: int = 30) -> torch.Tensor:
    ids = torch.randint(1, num_items + 1, (batch, length))
    for row in range(batch):
        ids[row, : row * 3] = 0  # left padding of different lengths
    return ids


@pytest.fixture(params=["convrec", "convrec-mask-aware", "faithful", "sasrec"])
def model(request, attribute_lists):
    kind = request.param
    if kind == "sasrec":
        return SASRec(30, d_model=16, max_len=20, item_attributes=attribute_lists).eval()
    return ConvRec(
        30,
        d_model=16,
        item_attributes=attribute_lists,
        mask_aware=kind == "convrec-mask-aware",
        faithful=kind == "faithful",
        max_len=20 if kind == "faithful" else None,
    ).eval()


def test_shared_interface(model) -> None:
    ids = _histories()
    user = model.encode(ids)
    assert user.shape == (4, 16)
    all_scores = model.score(ids)
    assert all_scores.shape == (4, 31) and torch.isinf(all_scores[:, 0]).all()
    candidates = torch.randint(1, 31, (4, 7))
    picked = model.score(ids, candidates)
    torch.testing.assert_close(picked, all_scores.gather(1, candidates), rtol=1e-5, atol=1e-5)
    scores, top = model.recommend(ids, k=5)
    assert top.shape == (4, 5) and (top >= 1).all()
    torch.testing.assert_close(scores, all_scores.topk(5).values)


def test_recommend_excludes(model) -> None:
    ids = _histories()
    _, top = model.recommend(ids, k=5, exclude=ids)
    for row in range(ids.shape[0]):
        assert not set(top[row].tolist()) & set(ids[row].tolist())
    seen = torch.zeros(4, 31, dtype=torch.bool)
    seen[:, 1:26] = True
    _, top = model.recommend(ids, k=5, exclude=seen)
    assert (top > 25).all()
    with pytest.raises(ValueError, match="k must be"):
        model.recommend(ids, k=31)


def test_training_step_updates_every_parameter(model) -> None:
    model.train()
    ids = _histories()
    target = torch.randint(1, 31, (4,))
    loss = F.cross_entropy(model.score(ids), target)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    # the faithful date projection's weight reads dates only (use_time); its bias always counts
    if getattr(model, "faithful", False) and not model.item_encoder.use_time:
        missing.remove("item_encoder.context_encoder.weight")
    assert not missing, missing


@pytest.mark.parametrize("kind", ["convrec-mask-aware", "sasrec"])
def test_prepended_padding_changes_nothing(kind: str, attribute_lists) -> None:
    if kind == "sasrec":
        model = SASRec(30, d_model=16, max_len=40, item_attributes=attribute_lists)
    else:
        model = ConvRec(30, d_model=16, item_attributes=attribute_lists, mask_aware=True)
    model.eval()
    ids = _histories()
    longer = torch.cat([torch.zeros(4, 9, dtype=torch.long), ids], dim=1)
    torch.testing.assert_close(model.encode(longer), model.encode(ids), rtol=1e-5, atol=1e-5)


def test_sasrec_sdpa_equals_naive_attention(attribute_lists) -> None:
    naive = SASRec(30, d_model=16, max_len=20, heads=4, attention="naive").eval()
    sdpa = SASRec(30, d_model=16, max_len=20, heads=4, attention="sdpa").eval()
    sdpa.load_state_dict(naive.state_dict())
    ids = _histories()
    ids[3] = 0  # an all-padding row
    torch.testing.assert_close(sdpa.encode(ids), naive.encode(ids), rtol=1e-5, atol=1e-5)
    assert (sdpa.encode(ids)[3] == 0).all()


@pytest.mark.parametrize("attention", ["sdpa", "naive"])
def test_sasrec_scores_every_position_causally(attribute_lists, attention: str) -> None:
    model = SASRec(30, d_model=16, max_len=12, attention=attention, item_attributes=attribute_lists)
    model.eval()
    ids = _histories()
    every = model(ids, every_position=True)
    mask = ids != 0
    assert every.shape == (int(mask.sum()), 31) and (every[:, 0] == float("-inf")).all()
    # the newest slot of each non-empty row is the ordinary score
    last_rows = mask.sum(1).cumsum(0)[mask[:, -1]] - 1
    torch.testing.assert_close(every[last_rows], model.score(ids)[mask[:, -1]])
    # causal: changing the newest items leaves every earlier slot unchanged
    changed = ids.clone()
    changed[:, -2:] = torch.randint(1, 31, (ids.shape[0], 2))
    earlier = mask.clone()
    earlier[:, -2:] = False
    keep = earlier[mask]
    torch.testing.assert_close(model(changed, every_position=True)[keep], every[keep])


def test_convrec_refuses_every_position(attribute_lists) -> None:
    model = ConvRec(30, d_model=16, item_attributes=attribute_lists)
    with pytest.raises(TypeError, match="all-prefixes"):
        model(_histories(), every_position=True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_convrec_input_dropout(attribute_lists, backend: str) -> None:
    """Training drops history vectors before level 1 (the fused Triton path steps aside for
    it); evaluation and the candidate vectors are untouched."""
    kwargs = dict(d_model=16, item_attributes=attribute_lists, dropout=0.0, mask_aware=True)
    model = ConvRec(30, input_dropout=0.5, backend=backend, **kwargs)
    plain = ConvRec(30, backend="reference", **kwargs)
    plain.load_state_dict(model.state_dict())
    ids = _histories()
    mask = ids != 0
    model.train()
    torch.manual_seed(3)
    dropped = model.encode(ids)
    torch.manual_seed(3)
    x = hashed_dropout(plain.item_encoder(ids, mask), 0.5, True)  # the same seed: same masks
    torch.testing.assert_close(dropped, plain.encoder(x, mask), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(dropped, plain.train().encode(ids), atol=1e-3)
    model.eval()
    plain.eval()
    torch.testing.assert_close(model.encode(ids), plain.encode(ids), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.item_encoder.all_items(), plain.item_encoder.all_items())
    with pytest.raises(ValueError, match=r"input_dropout must be in \[0, 1\), got 1.0"):
        ConvRec(30, input_dropout=1.0)


def _without(model: ConvRec, extra: str, **kwargs) -> ConvRec:
    """A ConvRec built from ``kwargs`` (no ``extra`` part) holding ``model``'s other weights."""
    plain = ConvRec(model.num_items, **kwargs).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(extra)})
    return plain


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_convrec_last_item_skip(attribute_lists, backend: str) -> None:
    """user = levels' output + g * (newest history item's vector), on the fused path too."""
    kwargs = dict(d_model=16, item_attributes=attribute_lists, mask_aware=True)
    model = ConvRec(30, readouts=["last_item_skip"], backend=backend, **kwargs).eval()
    gate = model.readouts["last_item_skip"].gate
    with torch.no_grad():
        gate.normal_()
    plain = _without(model, "readouts.", backend="reference", **kwargs)
    ids = _histories()
    ids[3] = 0  # an all-padding row: nothing to add
    newest = plain.item_encoder(ids, ids != 0)[:, -1]
    expected = plain.encode(ids) + gate * newest
    torch.testing.assert_close(model.encode(ids), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.encode(ids)[3], plain.encode(ids)[3], rtol=1e-4, atol=1e-4)
    model.train()
    F.cross_entropy(model.score(ids[:3]), torch.tensor([1, 2, 3])).backward()
    assert gate.grad is not None and gate.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("readout", ["last_item_transition", "last_item_mlp", "last_item_table"])
def test_convrec_last_item_maps(attribute_lists, backend: str, readout: str) -> None:
    """user = levels' output + map(newest history item's vector, or its id for the table), on
    the fused path too; the map's output starts at zero, so the model starts as the one
    without it."""
    kwargs = dict(d_model=16, item_attributes=attribute_lists, mask_aware=True)
    model = ConvRec(30, readouts=[readout], backend=backend, **kwargs).eval()
    mapping = model.readouts[readout]
    ids = _histories()
    ids[3] = 0
    plain = _without(model, "readouts.", backend="reference", **kwargs)
    torch.testing.assert_close(model.encode(ids), plain.encode(ids), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        for parameter in mapping.parameters():
            parameter.normal_()
    newest = plain.item_encoder(ids, ids != 0)[:, -1]
    term = {
        "last_item_transition": lambda: newest @ mapping.map.weight.T,
        "last_item_mlp": lambda: mapping.mlp(newest),
        "last_item_table": lambda: mapping.table.weight[ids[:, -1]],
    }[readout]()
    expected = plain.encode(ids) + term
    torch.testing.assert_close(model.encode(ids), expected, rtol=1e-4, atol=1e-4)
    model.train()
    F.cross_entropy(model.score(ids[:3]), torch.tensor([1, 2, 3])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mapping.parameters())
    if readout == "last_item_table":  # only the rows of the newest items learn
        assert set(mapping.table.weight.grad.abs().sum(1).nonzero().flatten().tolist()) == set(
            ids[:3, -1].tolist()
        )


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_convrec_attention_readout(attribute_lists, backend: str) -> None:
    """user = u + out(softmax over real slots of q(u) . x / sqrt(D) @ x), u = levels + skip,
    on the fused path too; an all-padding history adds nothing."""
    kwargs = dict(d_model=16, item_attributes=attribute_lists, mask_aware=True)
    skip = dict(kwargs, readouts=["last_item_skip"])
    # given out of order: the terms are added in the registry's order all the same
    model = ConvRec(30, readouts=["attention", "last_item_skip"], backend=backend, **kwargs).eval()
    assert list(model.readouts) == ["last_item_skip", "attention"]
    readout = model.readouts["attention"]
    with torch.no_grad():
        model.readouts["last_item_skip"].gate.normal_()
        readout.out.weight.normal_()
    plain = _without(model, "readouts.attention.", backend="reference", **skip)
    ids = _histories()
    ids[3] = 0
    mask = ids != 0
    x = plain.item_encoder(ids, mask)
    u = plain.encode(ids)
    expected = []
    for b in range(ids.shape[0]):
        real = x[b, mask[b]]
        if real.shape[0] == 0:
            expected.append(u[b])
            continue
        weights = (real @ readout.query(u[b]) / 4.0).softmax(0)
        expected.append(u[b] + readout.out(weights @ real))
    with torch.no_grad():
        torch.testing.assert_close(model.encode(ids), torch.stack(expected), rtol=1e-4, atol=1e-4)
    model.train()
    F.cross_entropy(model.score(ids[:3]), torch.tensor([1, 2, 3])).backward()
    for weight in (readout.query.weight, readout.out.weight):
        assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_attention_readout_starts_as_the_model_without_it(attribute_lists) -> None:
    kwargs = dict(d_model=16, item_attributes=attribute_lists, backend="reference")
    torch.manual_seed(0)
    model = ConvRec(30, readouts=["attention"], **kwargs).eval()
    plain = _without(model, "readouts.", **kwargs)
    ids = _histories()
    torch.testing.assert_close(model.encode(ids), plain.encode(ids))


def test_dense_features_and_time_context() -> None:
    features = torch.randn(31, 5)
    model = ConvRec(30, d_model=8, item_features=features, use_time=True).eval()
    ids = _histories()
    day = 86400
    times = torch.arange(12).repeat(4, 1) * day + 1_400_000_000
    user = model.encode(ids, times)
    assert user.shape == (4, 8)
    shifted = model.encode(ids, times + 3 * day)  # calendar features change with the date
    assert not torch.allclose(user, shifted)
    with pytest.raises(ValueError, match="timestamps"):
        model.encode(ids)
    # the feature projection is part of every item vector
    enc = model.item_encoder
    expected = enc.item_embedding.weight + enc.feature_proj(features)
    torch.testing.assert_close(model.item_vectors(), expected)


def test_time_context_features() -> None:
    day = 86400
    times = torch.tensor([[0, 5 * day, 5 * day, 9 * day]]) + 1_000_000 * day
    mask = torch.tensor([[False, True, True, True]])
    ctx = time_context(times, mask)
    assert ctx.shape == (1, 4, CONTEXT_DIM)
    assert (ctx[0, 0] == 0).all()  # padding
    gaps = ctx[0, 1:, 0].expm1()
    torch.testing.assert_close(gaps, torch.tensor([0.0, 0.0, 4.0]))  # first real item: no gap
    ages = ctx[0, 1:, 1].expm1()
    torch.testing.assert_close(ages, torch.tensor([4.0, 4.0, 0.0]))


def test_csr_tuple_equals_lists(attribute_lists) -> None:
    torch.manual_seed(1)
    a = ConvRec(30, d_model=8, item_attributes=attribute_lists)
    b = ConvRec(30, d_model=8, item_attributes=csr_from_lists(attribute_lists))
    b.load_state_dict(a.state_dict())
    ids = _histories()
    torch.testing.assert_close(a.eval().encode(ids), b.eval().encode(ids))


@pytest.mark.slow
def test_model_compiles_fullgraph(attribute_lists) -> None:
    model = ConvRec(30, d_model=16, item_attributes=attribute_lists, dropout=0.0).eval()
    ids = _histories()
    compiled = torch.compile(model.score, fullgraph=True)
    torch.testing.assert_close(compiled(ids), model.score(ids), rtol=1e-5, atol=1e-5)
