"""``stream_downscale``: the anchored level stack. For every prefix of random histories (padding,
several level schedules and head counts, mask-aware on and off) the one-pass reference and the
per-event state updates equal the stack run on that prefix alone, in float64."""

from __future__ import annotations

import pytest
import torch

from convrec import ConvRecEncoder
from convrec.ops.stream_downscale import (
    stream_downscale_prefix,
    stream_downscale_reference,
    stream_push,
    stream_state,
)
from tests.helpers import randomise

SCHEDULES = [[(3, 3)], [(2, 2), (3, 3)], [(2, 2), (2, 2), (2, 2)]]


def _setup(levels, heads, dtype=torch.float64, length=13, batch=4):
    encoder = randomise(ConvRecEncoder(8, levels, heads=heads, dropout=0.0)).to(dtype).eval()
    params = [level.params() for level in encoder.stack]
    strides = [s for _, s in levels]
    x = torch.randn(batch, length, 8, dtype=dtype)
    mask = torch.ones(batch, length, dtype=torch.bool)
    for row, real in enumerate((length, 1, length - 4, 0)[:batch]):
        mask[row, : length - real] = False
    return params, strides, x * mask[..., None], mask


@pytest.mark.parametrize("levels", SCHEDULES)
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("mask_aware", [False, True])
def test_every_prefix_equals_the_prefix_alone(levels, heads, mask_aware) -> None:
    params, strides, x, mask = _setup(levels, heads)
    every = stream_downscale_reference(x, mask, params, strides, heads, mask_aware)
    length = x.shape[1]
    for row in range(x.shape[0]):
        real = torch.nonzero(mask[row]).flatten().tolist()
        for n in range(1, len(real) + 1):
            prefix = torch.zeros(1, length, 8, dtype=x.dtype)
            prefix[0, length - n :] = x[row, real[:n]]
            alone = stream_downscale_prefix(
                prefix, prefix.abs().sum(-1) > 0, params, strides, heads, mask_aware
            )
            torch.testing.assert_close(every[row, real[n - 1]], alone[0], rtol=0, atol=1e-12)
        assert (every[row, ~mask[row]] == 0).all()


@pytest.mark.parametrize("levels", SCHEDULES)
@pytest.mark.parametrize("mask_aware", [False, True])
def test_pushing_events_equals_the_one_pass_reference(levels, mask_aware) -> None:
    """Users at different points of their histories pushed together, one event each."""
    params, strides, x, mask = _setup(levels, heads=2)
    every = stream_downscale_reference(x, mask, params, strides, 2, mask_aware)
    length = x.shape[1]
    starts = length - mask.sum(1)  # each row's first real slot
    state = stream_state(x.shape[0], 8, len(levels), x)
    for step in range(length):
        slots = (starts + step).clamp(max=length - 1)
        live = starts + step < length
        events = x[torch.arange(x.shape[0]), slots]
        user, pushed = stream_push(state, events, params, strides, 2, mask_aware)
        state = type(state)(*(
            _keep(new, old, live) for new, old in zip(pushed, state, strict=True)
        ))  # fmt: skip
        expected = every[torch.arange(x.shape[0]), slots]
        torch.testing.assert_close(user[live], expected[live], rtol=0, atol=1e-12)


def _keep(new, old, live):
    """Rows that had no event left keep their state (lists hold one tensor per level)."""
    if isinstance(new, list):
        return [_keep(n, o, live) for n, o in zip(new, old, strict=True)]
    return torch.where(live.view(-1, *[1] * (new.dim() - 1)), new, old)


def test_the_state_is_a_few_kilobytes() -> None:
    state = stream_state(1, 64, 3, torch.zeros(1, dtype=torch.bfloat16))
    tensors = [t for part in state for t in (part if isinstance(part, list) else [part])]
    assert sum(t.numel() * t.element_size() for t in tensors) <= 8 * 1024


def test_float32_follows_float64() -> None:
    params, strides, x, mask = _setup([(2, 2), (3, 3)], heads=1)
    exact = stream_downscale_reference(x, mask, params, strides, 1, True)
    single = stream_downscale_reference(
        x.float(), mask, [type(p)(*(t.float() for t in p)) for p in params], strides, 1, True
    )
    torch.testing.assert_close(single.double(), exact, rtol=1e-4, atol=1e-5)


def test_training_draws_dropout_and_backpropagates() -> None:
    params, strides, x, mask = _setup([(2, 2), (3, 3)], heads=1, dtype=torch.float32)
    x.requires_grad_()
    out = stream_downscale_reference(x, mask, params, strides, 1, True, dropout=0.5, training=True)
    eval_out = stream_downscale_reference(x, mask, params, strides, 1, True)
    assert not torch.allclose(out, eval_out)
    out.sum().backward()
    assert x.grad[mask].abs().sum() > 0 and (x.grad[~mask] == 0).all()


def test_overlapping_windows_are_refused() -> None:
    params, strides, x, mask = _setup([(3, 2)], heads=1)
    with pytest.raises(ValueError, match="kernel == stride at every level; level 0 has kernel 3"):
        stream_downscale_reference(x, mask, params, strides, 1)
