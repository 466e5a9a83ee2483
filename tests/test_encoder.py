"""``downscale`` and ``ConvRecEncoder``: the paper's stack re-derived, masks, autograd, compile."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from convrec import ConvRecEncoder
from convrec.encoder import LEVEL_KEYS
from convrec.schedule import level_geometry
from tests.helpers import paper_stack, randomise


@pytest.mark.parametrize("length", [1, 3, 35, 50, 97])
@pytest.mark.parametrize("heads", [1, 4])
def test_matchespaper_stack(length: int, heads: int) -> None:
    encoder = randomise(ConvRecEncoder(16, heads=heads)).eval()
    x = torch.randn(3, length, 16)
    torch.testing.assert_close(encoder(x), paper_stack(encoder, x))


def test_mask_zeroes_padded_inputs() -> None:
    encoder = randomise(ConvRecEncoder(8)).eval()
    x = torch.randn(2, 12, 8)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[:, :4] = False
    torch.testing.assert_close(encoder(x, mask), paper_stack(encoder, x * mask[..., None]))


def test_mask_aware_ignores_prepended_padding() -> None:
    encoder = randomise(ConvRecEncoder(8, mask_aware=True)).eval()
    plain = randomise(ConvRecEncoder(8, mask_aware=False)).eval()
    x = torch.randn(3, 23, 8)
    mask = torch.ones(3, 23, dtype=torch.bool)
    mask[1, :9] = False  # a row that is itself partly padded
    longer_x = torch.cat([torch.randn(3, 40, 8), x], dim=1)  # garbage under the padding
    longer_mask = torch.cat([torch.zeros(3, 40, dtype=torch.bool), mask], dim=1)
    torch.testing.assert_close(encoder(longer_x, longer_mask), encoder(x, mask))
    # without mask-aware pooling the padding does change the result (the paper's behaviour)
    assert not torch.allclose(plain(longer_x, longer_mask), plain(x, mask), atol=1e-4)


def test_all_padding_row_is_zero_when_mask_aware() -> None:
    encoder = randomise(ConvRecEncoder(8, mask_aware=True)).eval()
    x = torch.randn(2, 10, 8)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0] = False
    out = encoder(x, mask)
    assert (out[0] == 0).all() and out[1].abs().sum() > 0


@pytest.mark.parametrize("length", [1, 9, 50, 71])
def test_return_levels_follow_geometry(length: int) -> None:
    encoder = ConvRecEncoder(8).eval()
    user, levels = encoder(torch.randn(2, length, 8), return_levels=True)
    expected = [n for _, n in level_geometry(length, encoder.levels)]
    assert [lv.shape[1] for lv in levels] == expected
    torch.testing.assert_close(user, levels[-1].mean(1))


def test_fixed_length_matches_explicit_padding() -> None:
    fixed = randomise(ConvRecEncoder(8, fixed_length=35)).eval()
    free = ConvRecEncoder(8)
    free.load_state_dict(fixed.state_dict())
    free.eval()
    x = torch.randn(2, 20, 8)
    padded = torch.cat([torch.zeros(2, 15, 8), x], dim=1)
    torch.testing.assert_close(fixed(x), free(padded))
    with pytest.raises(ValueError, match="fixed_length"):
        fixed(torch.randn(2, 36, 8))


@pytest.mark.parametrize("mask_aware", [False, True])
def test_gradcheck_float64_all_parameters(mask_aware: bool) -> None:
    encoder = ConvRecEncoder(
        4, levels=[(2, 2), (3, 2)], heads=2, dropout=0.0, mask_aware=mask_aware
    )
    encoder = randomise(encoder.double())
    names = [n for n, _ in encoder.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in encoder.parameters())
    x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False

    def fn(x, *ps):
        return torch.func.functional_call(encoder, dict(zip(names, ps, strict=True)), (x, mask))

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_dropout_only_in_training() -> None:
    encoder = ConvRecEncoder(8, dropout=0.5)
    x = torch.randn(2, 30, 8)
    encoder.train()
    assert not torch.allclose(encoder(x), encoder(x))
    encoder.eval()
    torch.testing.assert_close(encoder(x), encoder(x))


@pytest.mark.slow
def test_compile_fullgraph_matches_eager() -> None:
    encoder = randomise(ConvRecEncoder(16, heads=2, dropout=0.0, mask_aware=True))
    compiled = torch.compile(encoder, fullgraph=True)
    x = torch.randn(3, 35, 16, requires_grad=True)
    mask = torch.ones(3, 35, dtype=torch.bool)
    mask[0, :10] = False
    eager_out = encoder(x, mask)
    (eager_grad,) = torch.autograd.grad(eager_out.square().sum(), x)
    compiled_out = compiled(x, mask)
    (compiled_grad,) = torch.autograd.grad(compiled_out.square().sum(), x)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    length=st.integers(1, 120),
    heads=st.sampled_from([1, 2, 4]),
    levels=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 8)), min_size=1, max_size=4),
    mask_aware=st.booleans(),
)
def test_fuzzed_shapes(batch, length, heads, levels, mask_aware) -> None:
    levels = [(max(k, s), min(k, s)) for k, s in levels]
    encoder = ConvRecEncoder(8, levels, heads=heads, mask_aware=mask_aware).eval()
    x = torch.randn(batch, length, 8)
    mask = torch.rand(batch, length) > 0.3
    user, outs = encoder(x, mask, return_levels=True)
    assert user.shape == (batch, 8) and torch.isfinite(user).all()
    assert [o.shape[1] for o in outs] == [n for _, n in level_geometry(length, levels)]


def test_state_dict_is_backend_independent() -> None:
    auto = ConvRecEncoder(8, backend="auto")
    reference = ConvRecEncoder(8, backend="reference")
    reference.load_state_dict(auto.state_dict())
    assert list(auto.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 11, 8)
    torch.testing.assert_close(auto.eval()(x), reference.eval()(x))
    assert list(auto.state_dict()) == ["stack_weights"]


def test_packed_stack_is_the_per_level_tensors() -> None:
    """``stack_weights`` holds every level's tensors in the ``LEVEL_KEYS`` layout: a state_dict
    of per-level tensors (what encoders wrote before packing) loads into the same model, the
    views ``level_params`` gives write through, and initialisation draws as separate modules
    did (same seed, same values)."""
    encoder = ConvRecEncoder(8, ((2, 2), (3, 2)), heads=2)
    per_level = {name: t.detach().clone() for name, t in encoder.level_state().items()}
    assert len(per_level) == 2 * len(LEVEL_KEYS) and per_level["stack.1.alpha"].shape == ()
    other = ConvRecEncoder(8, ((2, 2), (3, 2)), heads=2)
    other.load_state_dict(per_level)
    torch.testing.assert_close(other.stack_weights, encoder.stack_weights)
    with torch.no_grad():
        other.level_params()[1].beta.fill_(-3.0)
    assert other.level_state()["stack.1.beta"] == -3.0
    torch.manual_seed(4)
    first = ConvRecEncoder(8, ((2, 2), (3, 2)), heads=2)
    torch.manual_seed(4)
    conv, linear = nn.Conv1d(8, 8, 2, stride=2, groups=2), nn.Linear(8, 8)
    params = first.level_params()[0]
    torch.testing.assert_close(params.conv_weight, conv.weight)
    torch.testing.assert_close(params.linear_bias, linear.bias)
    with pytest.raises(RuntimeError, match="size mismatch for stack_weights"):
        ConvRecEncoder(8, ((3, 3), (3, 2)), heads=2).load_state_dict(per_level)


def test_for_length_covers() -> None:
    encoder = ConvRecEncoder.for_length(2048, 8, heads=2)
    assert encoder.levels == ((4, 4), (8, 8), (8, 8), (8, 8)) and encoder.heads == 2
    _, outs = encoder.eval()(torch.randn(1, 2048, 8), return_levels=True)
    assert outs[-1].shape[1] == 1
