"""``StackDropout``: the hash that decides which elements every backend drops. Its torch
arithmetic against plain Python integers, the keep rate, independence between levels, rows
and seeds, and the extension's decisions against it."""

from __future__ import annotations

import pytest
import torch

from convrec.ops.level_params import pack_levels
from convrec.ops.stack_dropout import StackDropout, keep_mask, keep_threshold
from tests.helpers import DEVICE, requires_extension, requires_triton


def lowbias32(x: int) -> int:
    """Wellons' lowbias32 with Python's unbounded ints, masked to 32 bits."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def python_keep(seed: tuple[int, int], level: int, row: int, channel: int, p: float) -> bool:
    key = lowbias32(seed[0] ^ lowbias32(seed[1] ^ lowbias32((level + 0x9E3779B9) & 0xFFFFFFFF)))
    row_key = lowbias32(
        key ^ lowbias32((row & 0xFFFFFFFF) ^ lowbias32(((row >> 32) + 0x85EBCA6B) & 0xFFFFFFFF))
    )
    h = lowbias32((row_key + channel * 0x7FEB352D) & 0xFFFFFFFF)
    return (h >> 8) >= keep_threshold(p)


def test_torch_arithmetic_equals_python_integers() -> None:
    seed = (0xFFFFFFFF, 123456789)  # words near the top of the range
    got = keep_mask(torch.tensor(seed), 3, 40, 16, 0.37)
    expected = [[python_keep(seed, 3, n, c, 0.37) for c in range(16)] for n in range(40)]
    assert got.tolist() == expected


def test_keep_rate_and_independence() -> None:
    seed = torch.tensor([7, 11])
    masks = [keep_mask(seed, level, 4000, 64, 0.3) for level in range(2)]
    for mask in masks:
        assert abs(mask.double().mean().item() - 0.7) < 0.005
    other_seed = keep_mask(torch.tensor([8, 11]), 0, 4000, 64, 0.3)
    for other in (masks[1], other_seed):  # agreement of independent draws: 0.7^2 + 0.3^2
        assert abs((masks[0] == other).double().mean().item() - 0.58) < 0.005
    rows = masks[0].double()
    assert abs((rows[1:] == rows[:-1]).double().mean().item() - 0.58) < 0.005


def test_draw_only_in_training() -> None:
    assert StackDropout.draw(0.2, False, torch.device("cpu")) is None
    assert StackDropout.draw(0.0, True, torch.device("cpu")) is None
    drop = StackDropout.draw(0.25, True, torch.device("cpu"))
    y = torch.ones(3, 5, 8)
    keep = keep_mask(drop.seed, 1, 15, 8, 0.25).view(3, 5, 8)
    torch.testing.assert_close(drop.apply(y, 1), keep * (4 / 3))


@requires_triton
@pytest.mark.parametrize(("rows", "d"), [(1, 1), (37, 16), (300, 70)])
def test_triton_factors_are_the_hash(rows: int, d: int) -> None:
    """One Triton launch per level gives the torch hash's decisions (several tiles each way,
    ragged edges), and the triton path of the stack applies them."""
    seed = torch.tensor([0xFFFFFFFF, 4242], device=DEVICE)
    drop = StackDropout(0.3, seed, "triton")
    y = torch.ones(rows, d, device=DEVICE)
    expected = keep_mask(seed, 2, rows, d, 0.3).to(torch.float32) / 0.7
    torch.testing.assert_close(drop.apply(y, 2), expected)
    torch.testing.assert_close(drop._replace(backend="reference").apply(y, 2), expected)


@requires_extension
def test_extension_drops_what_the_hash_says() -> None:
    """With alpha = beta = 0 a level's output is the LayerNorm of its dropped-out GELU terms,
    so the op's output, rebuilt from its saved pre-activations and the hash's mask, shows that
    the kernel dropped exactly what ``keep_mask`` says."""
    from convrec import ConvRecEncoder

    encoder = ConvRecEncoder(8, ((1, 1),), dropout=0.4).double()
    with torch.no_grad():
        encoder.level_params()[0].alpha.zero_()
        encoder.level_params()[0].beta.zero_()
    p = encoder.level_params()[0]
    seed = torch.tensor([99, 5])
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    packed = pack_levels(encoder.level_params(), 1)
    args = ([1], [1], 1, False, seed, 0.4, 1e-5, False, True)
    _, levels, saved = torch.ops.convrec.downscale(x, None, None, packed.flat, *args)
    pre = saved[1].view(2, 6, 8)
    keep = keep_mask(seed, 0, 12, 8, 0.4).view(2, 6, 8)
    y = torch.nn.functional.gelu(pre) * keep / 0.6
    expected = torch.nn.functional.layer_norm(y, (8,), p.norm_weight, p.norm_bias, 1e-5)
    torch.testing.assert_close(levels[0], expected)


@requires_extension
@pytest.mark.parametrize("shape", [(1, 1), (37, 16), (3, 5, 67)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extension_op_applies_the_hash(shape, dtype) -> None:
    """``torch.ops.convrec.stack_dropout`` multiplies by the hash's factors forward, and its
    gradient is the incoming gradient times the same factors."""
    seed = torch.tensor([0xFFFFFFFF, 4242])
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    d = shape[-1]
    keep = keep_mask(seed, 5, x.numel() // d, d, 0.3).view(shape).to(dtype) / 0.7
    out = StackDropout(0.3, seed, "cpp").apply(x, 5)
    torch.testing.assert_close(out, x * keep, rtol=0, atol=0)
    grad = torch.randn(shape, dtype=dtype)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad * keep, rtol=0, atol=0)
    reference = StackDropout(0.3, seed, "reference").apply(x.detach(), 5)
    torch.testing.assert_close(out.detach(), reference)


@requires_extension
def test_extension_op_opcheck() -> None:
    x = torch.randn(4, 3, 8, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.convrec.stack_dropout.default, (x, torch.tensor([3, 4]), 1, 0.2)
    )


@requires_extension
def test_hashed_dropout_is_dropout_on_every_backend() -> None:
    """``hashed_dropout``: identity in eval or with p = 0; in training the same elements on
    the reference and the extension for the same torch seed, at the rate p."""
    from convrec.ops.stack_dropout import hashed_dropout

    x = torch.ones(200, 64)
    assert hashed_dropout(x, 0.3, False, "cpp") is x
    assert hashed_dropout(x, 0.0, True, "cpp") is x
    torch.manual_seed(1)
    fast = hashed_dropout(x, 0.3, True, "cpp")
    torch.manual_seed(1)
    reference = hashed_dropout(x, 0.3, True, "reference")
    torch.testing.assert_close(fast, reference, rtol=0, atol=0)
    assert abs((fast == 0).double().mean().item() - 0.3) < 0.02
    with pytest.raises(RuntimeError, match=r"stack_dropout: dropout must be in \(0, 1\)"):
        torch.ops.convrec.stack_dropout(x, torch.tensor([1, 2]), 0, 1.0)
