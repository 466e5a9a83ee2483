"""``conv_pool``: one down-scale level's convolution and its two average pools.

The reference below is the oracle for the Triton kernel (``kernels/conv_pool.py``) and the
building block of the ``downscale`` reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from convrec.schedule import left_pad


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
    """Dispatch to the implementation named by ``backend`` (see ``conv_pool_reference``)."""
    if backend == "reference":
        return conv_pool_reference(x, residual, weight, bias, stride, heads, mask)
    raise NotImplementedError(f"conv_pool has no {backend!r} implementation")


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
