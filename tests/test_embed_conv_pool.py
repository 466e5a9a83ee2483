"""``embed_conv_pool`` (gather fused into level 1) against its reference, and the Triton backend
of ``ConvRecEncoder`` and ``ConvRec`` against the reference backend: values and every gradient
under the tolerance rule, deterministic mode, int64 offsets, opcheck, torch.compile, fallbacks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

from convrec import ConvRec, ConvRecEncoder
from convrec.ops import dispatch, embed_conv_pool
from convrec.ops.item_tables import ItemTables, csr_from_lists
from tests.helpers import (
    DEVICE,
    DEVICE_DTYPES,
    compare_backends,
    histories,
    random_catalogue,
    randomise,
    requires_triton,
    reserve_int32,
)

# (batch, length, width, heads, kernel, stride, mask-aware, attributes)
FUSED_CASES_CPU = [
    (1, 1, 8, 1, 5, 5, False, True),
    (3, 4, 8, 2, 5, 5, True, True),
    (1, 5, 8, 1, 5, 5, True, False),
    (3, 35, 16, 2, 5, 5, False, True),
    (3, 50, 8, 1, 5, 5, True, True),
    (1, 97, 12, 3, 5, 5, False, True),
    (3, 35, 8, 2, 3, 2, True, True),
    (3, 50, 6, 2, 2, 2, False, False),
]
FUSED_CASES_CUDA = [
    (1, 1, 64, 1, 5, 5, False, True),
    (3, 97, 64, 2, 3, 2, True, True),
    (128, 512, 256, 1, 2, 2, False, True),
    (128, 512, 256, 4, 7, 7, True, True),
    (64, 2048, 64, 1, 8, 8, True, False),
]


def _fused_inputs(case, device: str) -> tuple[dict, dict]:
    batch, length, width, heads, kernel, stride, mask_aware, attributes = case
    offsets, attr_ids, _ = random_catalogue(60, 13, 4, device)
    ids = histories(batch, length, 60, device)
    inputs = dict(
        ids=ids if batch == 1 else ids.T.contiguous().T,  # column-major ids
        item_table=torch.randn(61, width, device=device),
        attr_table=torch.randn(13, width, device=device) if attributes else None,
        offsets=offsets,
        attr_ids=attr_ids,
        weight=torch.randn(width, width // heads, kernel, device=device) / kernel**0.5,
        bias=torch.randn(width, device=device),
    )
    return {k: v for k, v in inputs.items() if v is not None}, dict(
        stride=stride, heads=heads, mask_aware=mask_aware
    )


def _fused(backend, ids, item_table, weight, bias, offsets, attr_ids, attr_table=None, **geo):
    if attr_table is None:
        offsets = attr_ids = None
    tables = ItemTables(item_table, offsets, attr_ids, attr_table)
    geometry = (geo["stride"], geo["heads"])
    return embed_conv_pool(
        ids, tables, weight, bias, *geometry, mask_aware=geo["mask_aware"], backend=backend
    )


@requires_triton
@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@pytest.mark.parametrize("case", range(len(FUSED_CASES_CPU)))
def test_triton_fused_matches_reference(device, dtype, case) -> None:
    cases = FUSED_CASES_CUDA if device == "cuda" else FUSED_CASES_CPU
    if case >= len(cases):
        pytest.skip("fewer CUDA cases")
    inputs, geometry = _fused_inputs(cases[case], device)
    wrt = [k for k in ("item_table", "attr_table", "weight", "bias") if k in inputs]
    compare_backends(lambda b, **t: _fused(b, **t, **geometry), inputs, wrt, dtype)


@requires_triton
@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize(
    "case", [(3, 50, 40, 1, 3, 2, True, True), (2, 64, 36, 2, 4, 4, False, True)]
)
def test_triton_fused_multi_tile(case) -> None:
    inputs, geometry = _fused_inputs(case, DEVICE)
    wrt = ["item_table", "attr_table", "weight", "bias"]
    compare_backends(lambda b, **t: _fused(b, **t, **geometry), inputs, wrt, torch.float32)


@requires_triton
def test_triton_fused_deterministic_mode_is_bit_identical() -> None:
    inputs, geometry = _fused_inputs((3, 40, 16, 2, 4, 4, True, True), DEVICE)
    inputs["ids"] = torch.randint(0, 6, (3, 40), device=DEVICE)  # heavy id collisions
    params = {k: inputs[k].requires_grad_() for k in ("item_table", "attr_table", "weight")}

    def grads() -> tuple[Tensor, ...]:
        out = _fused("triton", **inputs, **geometry)
        loss = out.conv.square().sum() + out.pooled.sum()
        return torch.autograd.grad(loss, tuple(params.values()))

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
def test_triton_fused_int64_offsets_past_2_31() -> None:
    """As in the gather test: CSR offsets above 2^31 into a reserved, mostly untouched array."""
    base = 2**31 + 5
    offsets, attr_ids, _ = random_catalogue(30, 9, 3, DEVICE)
    huge = reserve_int32(base + attr_ids.numel())
    huge[base:] = attr_ids.to(torch.int32)
    item_table = torch.randn(31, 8, device=DEVICE, requires_grad=True)
    attr_table = torch.randn(9, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(8, 8, 3, device=DEVICE, requires_grad=True)
    ids = histories(2, 17, 30, DEVICE)
    args = (weight, None, 3, 1)
    tables = ItemTables(item_table, offsets + base, huge, attr_table)
    out = embed_conv_pool(ids, tables, *args, backend="triton")
    expected = embed_conv_pool(ids, ItemTables(item_table, offsets, huge[base:], attr_table), *args)
    torch.testing.assert_close(out.conv, expected.conv)
    params = (item_table, attr_table, weight)
    got = torch.autograd.grad(out.conv.sum() + out.pooled.sum(), params)
    want = torch.autograd.grad(expected.conv.sum() + expected.pooled.sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@requires_triton
@pytest.mark.parametrize("attributes", [True, False])
def test_triton_fused_opcheck(attributes: bool, attribute_lists) -> None:
    offsets, attr_ids = (t.to(DEVICE) for t in csr_from_lists(attribute_lists))
    ids = histories(2, 9, 30, DEVICE)
    item_table = torch.randn(31, 8, device=DEVICE, requires_grad=True)
    attr = (offsets, attr_ids, torch.randn(9, 8, device=DEVICE, requires_grad=True))
    weight = torch.randn(8, 4, 2, device=DEVICE, requires_grad=True)
    bias = torch.randn(8, device=DEVICE, requires_grad=True)
    args = (ids, item_table, *(attr if attributes else (None,) * 3), weight, bias, ids != 0)
    torch.library.opcheck(torch.ops.convrec.embed_conv_pool.default, (*args, 2, 2, attributes))


@requires_triton
def test_triton_fused_rejects_bad_inputs() -> None:
    ids = torch.tensor([[1, 2, 3]], device=DEVICE)
    tables = ItemTables(torch.randn(5, 8, device=DEVICE))
    with pytest.raises(RuntimeError, match="kernel size 20 exceeds"):
        wide = torch.randn(8, 8, 20, device=DEVICE)
        embed_conv_pool(ids, tables, wide, None, 20, 1, backend="triton")
    weight = torch.randn(8, 8, 2, device=DEVICE)
    with pytest.raises(ValueError, match=r"conv weight must be \(D, D // heads, k\)"):
        embed_conv_pool(ids, tables, weight, None, 2, 2, backend="triton")
    with pytest.raises(ValueError, match="holds id 7"):
        embed_conv_pool(ids + 6, tables, weight, None, 2, 1, backend="triton")


# ---- backends of the encoder and the model ----


def _param_inputs(module: torch.nn.Module) -> dict[str, Tensor]:
    """Parameters by name, detached: ``compare_backends`` feeds them to ``functional_call``."""
    return {name: p.detach() for name, p in module.named_parameters()}


@requires_triton
@pytest.mark.parametrize(("length", "mask_aware"), [(1, True), (35, False), (97, True)])
def test_triton_encoder_matches_reference(length: int, mask_aware: bool) -> None:
    kwargs = dict(levels=[(2, 2), (3, 2), (5, 5)], heads=2, dropout=0.0, mask_aware=mask_aware)
    encoders = {
        b: ConvRecEncoder(8, backend=b, **kwargs).to(DEVICE).eval() for b in ("reference", "triton")
    }
    randomise(encoders["reference"])
    encoders["triton"].load_state_dict(encoders["reference"].state_dict())
    x = torch.randn(3, length, 8, device=DEVICE)
    mask = histories(3, length, 5, DEVICE) != 0

    def run(backend, x, **params):
        encoder = encoders[backend]
        return (torch.func.functional_call(encoder, params, (x, mask)),)

    inputs = {"x": x, **_param_inputs(encoders["reference"])}
    compare_backends(run, inputs, list(inputs), torch.float32)


def _models(mask_aware: bool, attribute_lists, **kwargs) -> dict[str, ConvRec]:
    models = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(3)
        models[backend] = ConvRec(
            30, d_model=8, levels=[(2, 2), (5, 5), (7, 7)], heads=2, dropout=0.0,
            item_attributes=attribute_lists, mask_aware=mask_aware, backend=backend, **kwargs,
        ).to(DEVICE).eval()  # fmt: skip
    randomise(models["reference"])
    models["triton"].load_state_dict(models["reference"].state_dict())
    return models


class _Scores(torch.nn.Module):
    """Scores of every real item as a module's forward, for ``functional_call``."""

    def __init__(self, model: ConvRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model.score(ids)[:, 1:]


@requires_triton
@pytest.mark.parametrize("mask_aware", [False, True])
def test_triton_model_matches_reference(mask_aware: bool, attribute_lists) -> None:
    """Scores over all items and every parameter gradient; the fused path runs level 1."""
    scorers = {b: _Scores(m) for b, m in _models(mask_aware, attribute_lists).items()}
    ids = histories(3, 35, 30, DEVICE)

    def run(backend, **params):
        return (torch.func.functional_call(scorers[backend], params, (ids,)),)

    inputs = _param_inputs(scorers["reference"])
    compare_backends(run, inputs, list(inputs), torch.float32)


@requires_triton
def test_triton_model_uses_the_fused_kernel(attribute_lists, monkeypatch) -> None:
    models = _models(True, attribute_lists)
    calls = []
    original = torch.ops.convrec.embed_conv_pool

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(torch.ops.convrec, "embed_conv_pool", spy)
    ids = histories(2, 12, 30, DEVICE)
    user = models["triton"].encode(ids)
    assert calls == [ids.shape]
    torch.testing.assert_close(user, models["reference"].encode(ids))
    assert list(models["triton"].state_dict()) == list(models["reference"].state_dict())


@requires_triton
def test_triton_encoder_forward_ids_returns_levels(attribute_lists) -> None:
    encoder = ConvRecEncoder(8, heads=2, dropout=0.0, backend="triton")
    encoder = randomise(encoder).to(DEVICE).eval()
    offsets, attr_ids = (t.to(DEVICE) for t in csr_from_lists(attribute_lists))
    item_table, attr_table = torch.randn(31, 8, device=DEVICE), torch.randn(9, 8, device=DEVICE)
    tables = ItemTables(item_table, offsets, attr_ids, attr_table)
    ids = histories(2, 23, 30, DEVICE)
    user, levels = encoder.forward_ids(ids, tables, return_levels=True)
    reference = ConvRecEncoder(8, heads=2, dropout=0.0, backend="reference").to(DEVICE).eval()
    reference.load_state_dict(encoder.state_dict())
    expected_user, expected_levels = reference.forward_ids(ids, tables, return_levels=True)
    torch.testing.assert_close(user, expected_user)
    for a, e in zip(levels, expected_levels, strict=True):
        torch.testing.assert_close(a, e)


def test_triton_backend_refuses_what_it_cannot_fuse(attribute_lists) -> None:
    with pytest.raises(ValueError, match="does not cover dense item features"):
        ConvRec(30, d_model=8, item_features=torch.randn(31, 3), backend="triton")
    with pytest.raises(ValueError, match="does not cover time context"):
        ConvRec(30, d_model=8, use_time=True, backend="triton")
    with pytest.raises(ValueError, match="faithful input block"):
        ConvRec(30, d_model=8, faithful=True, max_len=10, backend="triton")
    with pytest.raises(ValueError, match="kernel size 17 exceeds"):
        ConvRecEncoder(8, levels=[(17, 17)], backend="triton")


def test_auto_falls_back_with_one_warning(attribute_lists, monkeypatch) -> None:
    """Where "auto" picks Triton (CUDA), what it cannot take runs unfused or on the reference."""
    auto = {"cuda": "none", "cpp": "none", "triton": DEVICE}  # "auto" picks Triton, as on CUDA
    monkeypatch.setattr(dispatch, "AUTO_DEVICE", auto)
    dispatch.warn_once.cache_clear()
    model = ConvRec(30, d_model=8, item_features=torch.randn(31, 3), backend="auto")
    model = model.to(DEVICE).eval()
    wide = ConvRecEncoder(8, levels=[(17, 17)], backend="auto").to(DEVICE).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model.encode(histories(2, 9, 30, DEVICE))
            wide(torch.randn(2, 20, 8, device=DEVICE))
    messages = [str(w.message) for w in caught]
    assert sum("gathers items unfused" in m for m in messages) == 1
    assert sum("kernel size 17 exceeds" in m for m in messages) == 1


@pytest.mark.slow
@requires_triton
def test_triton_model_compiles_fullgraph(attribute_lists) -> None:
    model = _models(True, attribute_lists)["triton"]
    ids = histories(3, 20, 30, DEVICE)
    params = [p for p in model.parameters()]

    def loss(ids: Tensor) -> Tensor:
        return model.score(ids).log_softmax(-1)[:, 1:].mean()

    eager = torch.autograd.grad(loss(ids), params)
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(ids), params)
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6)
