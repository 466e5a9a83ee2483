"""``downscale``: the whole level stack of the ConvRec encoder and its mean readout.

The reference below is the oracle for the C++/CUDA extension (``csrc/downscale*``) and the CPU
fallback. Each level l computes, with r the long residual (r starts as the input):

    y = GELU(Linear(GroupedConv1d_k,s(pad(x))));  y = Dropout(y)
    x = LayerNorm(y + alpha_l * AvgPool_k,s(pad(x)) + beta_l * AvgPool_k,s(pad(r)))
    r = AvgPool_k,s(pad(r))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from convrec.ops.conv_pool import conv_pool


class LevelParams(NamedTuple):
    """The learnable tensors of one level, in the order the fast paths take them."""

    conv_weight: Tensor  # (D, D // heads, k)
    conv_bias: Tensor  # (D,)
    linear_weight: Tensor  # (D, D)
    linear_bias: Tensor  # (D,)
    alpha: Tensor  # () weight of the pooled level input
    beta: Tensor  # () weight of the pooled long residual
    norm_weight: Tensor  # (D,)
    norm_bias: Tensor  # (D,)


class DownscaleOutput(NamedTuple):
    user: Tensor  # (B, D) mean over the last level's positions
    levels: list[Tensor]  # each level's output (B, L_l, D); empty unless asked for


def downscale(
    x: Tensor,
    params: Sequence[LevelParams],
    strides: Sequence[int],
    heads: int,
    mask: Tensor | None = None,
    mask_aware: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    eps: float = 1e-5,
    return_levels: bool = False,
    backend: str = "reference",
) -> DownscaleOutput:
    """Dispatch to the implementation named by ``backend`` (see ``convrec.backends``)."""
    if backend == "reference":
        return downscale_reference(
            x, params, strides, heads, mask, mask_aware, dropout, training, eps, return_levels
        )
    raise NotImplementedError(f"downscale has no {backend!r} implementation")


def downscale_reference(
    x: Tensor,
    params: Sequence[LevelParams],
    strides: Sequence[int],
    heads: int,
    mask: Tensor | None = None,
    mask_aware: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    eps: float = 1e-5,
    return_levels: bool = False,
) -> DownscaleOutput:
    """Run every level on ``x`` (B, L, D) and read out the user vector (B, D).

    ``mask`` (B, L) bool (True = real item) zeroes padded inputs first. With ``mask_aware`` the
    pools and the readout average only over real positions and windows with no real position
    are zeroed at every level, so prepending padding changes nothing; otherwise (the paper's
    behaviour) padding counts as zeros in every average. Kernel sizes come from the conv weights.
    """
    if len(params) != len(strides):
        raise ValueError(f"{len(params)} level parameter sets but {len(strides)} strides")
    if mask is not None:
        x = x * mask.unsqueeze(-1).to(x.dtype)
    level_mask = mask if mask_aware else None
    residual = x
    outputs = []
    for p, stride in zip(params, strides, strict=True):
        conv, pooled, residual, level_mask = conv_pool(
            x, residual, p.conv_weight, p.conv_bias, stride, heads, level_mask
        )
        y = F.dropout(F.gelu(F.linear(conv, p.linear_weight, p.linear_bias)), dropout, training)
        mixed = y + p.alpha * pooled + p.beta * residual
        x = F.layer_norm(mixed, (x.shape[-1],), p.norm_weight, p.norm_bias, eps)
        if level_mask is not None:
            x = x * level_mask.unsqueeze(-1).to(x.dtype)
        if return_levels:
            outputs.append(x)
    if level_mask is None:
        user = x.mean(1)
    else:
        count = level_mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
        user = x.sum(1) / count
    return DownscaleOutput(user, outputs)
