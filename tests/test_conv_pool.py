"""``conv_pool`` reference: hand-computed windows, per-head re-derivation, mask-aware pools."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convrec.ops import conv_pool
from convrec.schedule import left_pad


def test_hand_computed_single_channel() -> None:
    x = torch.tensor([[[1.0], [2.0], [3.0]]])  # L=3, k=s=2 -> one zero in front
    res = torch.tensor([[[10.0], [20.0], [30.0]]])
    weight = torch.tensor([[[2.0, -1.0]]])  # (D=1, 1, k=2)
    bias = torch.tensor([0.5])
    out = conv_pool(x, res, weight, bias, stride=2, heads=1)
    # windows [0, 1] and [2, 3]
    torch.testing.assert_close(out.conv, torch.tensor([[[2 * 0 - 1 + 0.5], [2 * 2 - 3 + 0.5]]]))
    torch.testing.assert_close(out.pooled, torch.tensor([[[0.5], [2.5]]]))
    torch.testing.assert_close(out.residual, torch.tensor([[[5.0], [25.0]]]))
    assert out.mask is None


def test_hand_computed_mask_aware() -> None:
    x = torch.tensor([[[9.0], [2.0], [4.0]]])
    mask = torch.tensor([[False, True, True]])
    weight = torch.tensor([[[1.0, 1.0]]])
    out = conv_pool(x, x, weight, None, stride=2, heads=1, mask=mask)
    # first window = [pad, masked 9] -> nothing real; second = [2, 4]
    torch.testing.assert_close(out.conv, torch.tensor([[[0.0], [6.0]]]))
    torch.testing.assert_close(out.pooled, torch.tensor([[[0.0], [3.0]]]))
    assert out.mask.tolist() == [[False, True]]
    # one real item in a window of two: averaged over 1, not 2
    partial = conv_pool(x, x, weight, None, 2, 1, mask=torch.tensor([[False, False, True]]))
    torch.testing.assert_close(partial.pooled, torch.tensor([[[0.0], [4.0]]]))


def test_overlapping_windows() -> None:
    x = torch.arange(1.0, 6.0).view(1, 5, 1)  # k=3, s=2: pad 0, windows [1..3], [3..5]
    out = conv_pool(x, x, torch.ones(1, 1, 3), None, stride=2, heads=1)
    torch.testing.assert_close(out.pooled.flatten(), torch.tensor([2.0, 4.0]))


def _per_head_oracle(x, weight, bias, kernel, stride, heads):
    """The paper's form: one Conv1d per head on its slice of channels, outputs concatenated."""
    batch, length, d_model = x.shape
    head_dim = d_model // heads
    pad = left_pad(length, kernel, stride)
    padded = torch.cat([x.new_zeros(batch, pad, d_model), x], dim=1)
    n_out = (length + pad - kernel) // stride + 1
    out = x.new_zeros(batch, n_out, d_model)
    for h in range(heads):
        sl = slice(h * head_dim, (h + 1) * head_dim)
        for t in range(n_out):
            window = padded[:, t * stride : t * stride + kernel, sl]  # (B, k, Dh)
            out[:, t, sl] = torch.einsum("bkc,ock->bo", window, weight[sl]) + bias[sl]
    return out


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 40),
    heads=st.sampled_from([1, 2, 4]),
    kernel=st.integers(1, 9),
    data=st.data(),
)
def test_matches_per_head_loops(batch, length, heads, kernel, data) -> None:
    stride = data.draw(st.integers(1, kernel))
    d_model = 4 * heads
    x = torch.randn(batch, length, d_model, dtype=torch.float64)
    weight = torch.randn(d_model, d_model // heads, kernel, dtype=torch.float64)
    bias = torch.randn(d_model, dtype=torch.float64)
    out = conv_pool(x, x, weight, bias, stride, heads)
    torch.testing.assert_close(out.conv, _per_head_oracle(x, weight, bias, kernel, stride, heads))


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_float64(masked: bool) -> None:
    x = torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 7) > 0.3 if masked else None

    def fn(x, res, weight, bias):
        out = conv_pool(x, res, weight, bias, stride=2, heads=2, mask=mask)
        return out.conv, out.pooled, out.residual

    assert torch.autograd.gradcheck(fn, (x, res, weight, bias))
