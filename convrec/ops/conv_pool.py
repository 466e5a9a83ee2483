"""``conv_pool``: one down-scale level's convolution and its two average pools.

The reference below is the oracle for the Triton kernels (``triton/conv_pool.py``) and the
building block of the ``downscale`` reference. The Triton path is the custom op
``torch.ops.convrec.conv_pool`` with a fake implementation and autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from convrec.ops.dispatch import kernel_size_problem, resolve, triton_kernels
from convrec.schedule import left_pad, out_length


class ConvPoolOutput(NamedTuple):
    conv: Tensor  # (B, L_out, D) grouped-conv output, before the level's Linear
    pooled: Tensor  # (B, L_out, D) average of the level input over each window
    residual: Tensor  # (B, L_out, D) average of the long residual over each window
    mask: Tensor | None  # (B, L_out) bool: window holds >= 1 real position (mask-aware only)


def conv_pool(
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: int,
    heads: int,
    mask: Tensor | None = None,
    backend: str = "reference",
) -> ConvPoolOutput:
    """Dispatch to the implementation ``backend`` selects (``convrec.ops.dispatch``; fast path:
    "triton", for windows up to 16 wide); semantics as in ``conv_pool_reference``."""
    problem = kernel_size_problem(weight.shape[-1])
    if resolve("conv_pool", backend, x.device, problem) == "triton":
        check_level_inputs(x, residual, weight, bias, stride, heads, mask)
        conv, pooled, res, counts = torch.ops.convrec.conv_pool(
            x, residual, weight, bias, stride, heads, mask
        )
        return ConvPoolOutput(conv, pooled, res, None if mask is None else counts > 0)
    return conv_pool_reference(x, residual, weight, bias, stride, heads, mask)


def conv_pool_reference(
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: int,
    heads: int,
    mask: Tensor | None = None,
) -> ConvPoolOutput:
    """Left-pad, strided grouped Conv1d and average pools of ``x`` and ``residual`` over windows.

    ``x``, ``residual``: (B, L, D), channels last. ``weight``: (D, D // heads, k), ``bias``: (D,).
    Both inputs get ``left_pad(L, k, stride)`` zeros at the old end, so the newest window ends at
    position L - 1 and any L >= 1 works. Without ``mask`` the pools divide by k (padding counts as
    zeros, the paper's behaviour). With a (B, L) bool ``mask`` the pooling is mask-aware: masked
    positions are read as zeros by the conv and left out of both averages, a window without any
    real position averages to 0, and the output mask marks windows with a real position.
    """
    kernel = weight.shape[-1]
    pad = left_pad(x.shape[1], kernel, stride)
    if mask is not None:
        keep = mask.unsqueeze(-1).to(x.dtype)
        x, residual = x * keep, residual * keep
    x_padded = F.pad(x, (0, 0, pad, 0))
    res_padded = F.pad(residual, (0, 0, pad, 0))
    conv = F.conv1d(x_padded.transpose(1, 2), weight, bias, stride=stride, groups=heads)
    conv = conv.transpose(1, 2)
    # unfold gives (B, L_out, D, k) windows: sums are exact and independent of the conv path
    x_sum = x_padded.unfold(1, kernel, stride).sum(-1)
    res_sum = res_padded.unfold(1, kernel, stride).sum(-1)
    if mask is None:
        return ConvPoolOutput(conv, x_sum / kernel, res_sum / kernel, None)
    counts = F.pad(mask, (pad, 0)).unfold(1, kernel, stride).sum(-1)
    divisor = counts.clamp(min=1).unsqueeze(-1).to(x.dtype)
    return ConvPoolOutput(conv, x_sum / divisor, res_sum / divisor, counts > 0)


def check_level_inputs(
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: int,
    heads: int,
    mask: Tensor | None,
) -> None:
    """Raise naming the problem before a kernel reads memory it does not own."""
    if x.dim() != 3 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must be a non-empty (B, L, D) tensor, got {tuple(x.shape)}")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"residual {residual.dtype} {tuple(residual.shape)} must match x {x.dtype} "
            f"{tuple(x.shape)}"
        )
    if mask is not None and (mask.shape != x.shape[:2] or mask.dtype != torch.bool):
        raise ValueError(
            f"mask must be bool of shape {tuple(x.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}"
        )
    check_conv_weight(weight, bias, stride, heads, x.shape[2], x.dtype)


def check_conv_weight(
    weight: Tensor, bias: Tensor | None, stride: int, heads: int, width: int, dtype: torch.dtype
) -> None:
    """The grouped conv weight (D, D // heads, k) and bias (D,) of a level of width D."""
    if heads < 1 or width % heads != 0:
        raise ValueError(f"heads={heads} does not divide the width D={width}")
    if weight.shape[:2] != (width, width // heads) or weight.dim() != 3:
        raise ValueError(
            f"conv weight must be (D, D // heads, k) = ({width}, {width // heads}, k), "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != dtype:
        raise TypeError(f"conv weight is {weight.dtype}, the input {dtype}")
    if bias is not None and (bias.shape != (width,) or bias.dtype != dtype):
        raise ValueError(f"bias must be {dtype} ({width},), got {bias.dtype} {tuple(bias.shape)}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")


@torch.library.custom_op("convrec::conv_pool", mutates_args=())
def _conv_pool_op(
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: int,
    heads: int,
    mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(conv, pooled, pooled residual, int32 count of real positions per window)."""
    return triton_kernels("conv_pool").conv_pool_forward(
        x, residual, weight, bias, stride, heads, mask
    )


@_conv_pool_op.register_fake
def _(x, residual, weight, bias, stride, heads, mask):
    batch, length, width = x.shape
    windows = out_length(length, weight.shape[-1], stride)
    out = x.new_empty(batch, windows, width)
    counts = x.new_empty(batch, windows, dtype=torch.int32)
    return out, torch.empty_like(out), torch.empty_like(out), counts


@torch.library.custom_op("convrec::conv_pool_backward", mutates_args=())
def _conv_pool_backward_op(
    g_conv: Tensor,
    g_pool: Tensor,
    g_res: Tensor,
    x: Tensor,
    weight: Tensor,
    mask: Tensor | None,
    counts: Tensor,
    stride: int,
    heads: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x, residual, conv weight and bias."""
    module = triton_kernels("conv_pool")
    return module.conv_pool_backward(g_conv, g_pool, g_res, x, weight, mask, counts, stride, heads)


@_conv_pool_backward_op.register_fake
def _(g_conv, g_pool, g_res, x, weight, mask, counts, stride, heads):
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    return grad_x, torch.empty_like(grad_x), torch.empty_like(weight), weight.new_empty(x.shape[2])


def _setup_context(ctx, inputs, output) -> None:
    x, _, weight, bias, stride, heads, mask = inputs
    ctx.save_for_backward(x, weight, mask, output[3])
    ctx.stride, ctx.heads, ctx.has_bias = stride, heads, bias is not None


def _backward(ctx, g_conv: Tensor, g_pool: Tensor, g_res: Tensor, _counts: Tensor):
    x, weight, mask, counts = ctx.saved_tensors
    grad_x, grad_res, grad_w, grad_b = torch.ops.convrec.conv_pool_backward(
        g_conv, g_pool, g_res, x, weight, mask, counts, ctx.stride, ctx.heads
    )
    return grad_x, grad_res, grad_w, grad_b if ctx.has_bias else None, None, None, None


_conv_pool_op.register_autograd(_backward, setup_context=_setup_context)
