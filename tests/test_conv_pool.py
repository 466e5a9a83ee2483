"""``conv_pool``: the reference (hand-computed windows, per-head re-derivation, mask-aware
pools) and the Triton kernel against it (values and gradients under the tolerance rule, odd
shapes, overlapping windows, views, limits, opcheck, torch.compile)."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convrec.ops import conv_pool
from convrec.schedule import left_pad
from tests.helpers import DEVICE, DEVICE_DTYPES, compare_backends, requires_triton


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


# ---- Triton kernel: CPU interpreter in CI (small grids), full size and fp16/bf16 on CUDA ----

# (batch, length, width, heads, kernel, stride, mask-aware): L = 1, k - 1, k, 35, 50, 97 at
# k = s = 5; overlapping windows; the widest kernel; a width that is no multiple of 4.
LEVEL_CASES_CPU = [
    (1, 1, 8, 1, 5, 5, False),
    (3, 4, 8, 2, 5, 5, True),
    (1, 5, 8, 1, 5, 5, True),
    (3, 35, 16, 2, 5, 5, False),
    (3, 50, 8, 1, 5, 5, True),
    (1, 97, 12, 3, 5, 5, False),
    (3, 7, 8, 2, 3, 2, True),
    (3, 50, 16, 4, 4, 3, False),
    (2, 35, 8, 1, 16, 16, True),
    (3, 35, 6, 3, 2, 2, True),
    (3, 9, 4, 1, 1, 1, False),
]
LEVEL_CASES_CUDA = [
    (1, 1, 64, 1, 5, 5, False),
    (3, 97, 64, 2, 3, 2, True),
    (128, 512, 256, 1, 2, 2, False),
    (128, 512, 256, 4, 7, 7, True),
    (64, 2048, 64, 1, 8, 8, True),
]


def _level_inputs(case, device, non_contiguous: bool = False) -> dict:
    batch, length, width, heads, kernel, _, mask_aware = case
    x = torch.randn(batch, length, width, device=device)
    if non_contiguous:  # channels-first storage and a strided slice of a wider tensor
        x = torch.randn(batch, width, length, device=device).transpose(1, 2)
    residual = torch.randn(batch, 2 * length, width, device=device)[:, ::2]
    mask = torch.rand(batch, length, device=device) > 0.3
    mask[0] = False  # an all-padding row
    return dict(
        x=x,
        residual=residual if non_contiguous else residual.contiguous(),
        weight=torch.randn(width, width // heads, kernel, device=device) / kernel**0.5,
        bias=torch.randn(width, device=device),
        mask=mask if mask_aware else None,
    )


@requires_triton
@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@pytest.mark.parametrize("case", range(len(LEVEL_CASES_CPU)))
def test_triton_conv_pool_matches_reference(device, dtype, case) -> None:
    cases = LEVEL_CASES_CUDA if device == "cuda" else LEVEL_CASES_CPU
    if case >= len(cases):
        pytest.skip("fewer CUDA cases")
    heads, stride = cases[case][3], cases[case][5]
    inputs = _level_inputs(cases[case], device, non_contiguous=case % 3 == 1)
    if inputs["mask"] is None:
        del inputs["mask"]

    def run(backend, x, residual, weight, bias, mask=None):
        return conv_pool(x, residual, weight, bias, stride, heads, mask, backend=backend)

    compare_backends(run, inputs, ["x", "residual", "weight", "bias"], dtype)


@requires_triton
def test_triton_conv_pool_without_bias_and_bit_identical_runs() -> None:
    x = torch.randn(3, 23, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(8, 4, 3, device=DEVICE, requires_grad=True)
    mask = torch.rand(3, 23, device=DEVICE) > 0.5

    def run():
        out = conv_pool(x, x, weight, None, 2, 2, mask, backend="triton")
        loss = out.conv.sin().sum() + out.pooled.square().sum() + out.residual.sum()
        return (*out[:3], *torch.autograd.grad(loss, (x, weight)))

    first, second = run(), run()
    expected = conv_pool(x, x, weight, None, 2, 2, mask)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    for a, e in zip(first[:3], expected[:3], strict=True):
        torch.testing.assert_close(a, e)


@requires_triton
def test_triton_conv_pool_limits_and_errors() -> None:
    x = torch.randn(2, 40, 4, device=DEVICE)
    wide = torch.randn(4, 4, 17, device=DEVICE)
    with pytest.raises(RuntimeError, match="kernel size 17 exceeds"):
        conv_pool(x, x, wide, None, 17, 1, backend="triton")
    # "auto" on CPU tensors is the reference, whatever the kernel size
    torch.testing.assert_close(
        conv_pool(x.cpu(), x.cpu(), wide.cpu(), None, 17, 1, backend="auto").conv,
        conv_pool(x.cpu(), x.cpu(), wide.cpu(), None, 17, 1).conv,
    )
    weight = torch.randn(4, 4, 2, device=DEVICE)
    with pytest.raises(ValueError, match="heads=3 does not divide"):
        conv_pool(x, x, weight[:, :1], None, 2, 3, backend="triton")
    with pytest.raises(ValueError, match="residual"):
        conv_pool(x, x[:, 1:], weight, None, 2, 1, backend="triton")
    with pytest.raises(ValueError, match="mask must be bool"):
        conv_pool(x, x, weight, None, 2, 1, torch.ones(2, 40, device=DEVICE), backend="triton")


@requires_triton
@pytest.mark.parametrize("masked", [False, True])
def test_triton_conv_pool_opcheck(masked: bool) -> None:
    x = torch.randn(2, 11, 8, device=DEVICE, requires_grad=True)
    residual = torch.randn(2, 11, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(8, 4, 3, device=DEVICE, requires_grad=True)
    bias = torch.randn(8, device=DEVICE, requires_grad=True)
    mask = torch.rand(2, 11, device=DEVICE) > 0.3 if masked else None
    args = (x, residual, weight, bias, 2, 2, mask)
    torch.library.opcheck(torch.ops.convrec.conv_pool.default, args)


@pytest.mark.slow
@requires_triton
def test_triton_conv_pool_compiles_fullgraph() -> None:
    weight = torch.randn(8, 4, 3, device=DEVICE, requires_grad=True)

    def loss(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = conv_pool(x, x, weight, None, 2, 2, mask, backend="triton")
        return out.conv.square().sum() + out.pooled.sum() + out.residual.sum()

    x = torch.randn(3, 19, 8, device=DEVICE, requires_grad=True)
    mask = torch.rand(3, 19, device=DEVICE) > 0.3
    eager = torch.autograd.grad(loss(x, mask), (x, weight))
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(x, mask), (x, weight))
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e)


@requires_triton
@pytest.mark.parametrize(
    "case", [(3, 50, 40, 1, 3, 2, True), (2, 97, 36, 2, 5, 5, False), (1, 40, 48, 1, 4, 4, True)]
)
@pytest.mark.usefixtures("small_tiles")
def test_triton_conv_pool_multi_tile(case) -> None:
    heads, stride = case[3], case[5]
    inputs = _level_inputs(case, DEVICE)

    def run(backend, x, residual, weight, bias, mask):
        return conv_pool(x, residual, weight, bias, stride, heads, mask, backend=backend)

    if inputs["mask"] is None:
        del inputs["mask"]
        run = functools.partial(run, mask=None)
    compare_backends(run, inputs, ["x", "residual", "weight", "bias"], torch.float32)
