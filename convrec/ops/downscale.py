"""``downscale``: the whole level stack of the ConvRec encoder and the mean over the last level's
positions (the user vector; "readout" names the terms ``convrec.readouts`` adds to it).

The reference below is the oracle for the C++/CUDA extension (``csrc/downscale*``) and the CPU
fallback. Each level l computes, with r the long residual (r starts as the input):

    y = GELU(Linear(GroupedConv1d_k,s(pad(x))));  y = Dropout(y)
    x = LayerNorm(y + alpha_l * AvgPool_k,s(pad(x)) + beta_l * AvgPool_k,s(pad(r)))
    r = AvgPool_k,s(pad(r))

``paper_norm=True`` replaces LayerNorm by the paper code's normalisation
(``paper_layer_norm``); the reference and the extension implement it, Triton does not.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from convrec.ops.conv_pool import ConvPoolOutput, conv_pool
from convrec.ops.dispatch import kernel_size_problem, resolve
from convrec.ops.downscale_ext import downscale_extension
from convrec.ops.downscale_triton import downscale_triton, whole_stack_problem
from convrec.ops.level_params import LevelParams, PackedLevels, pack_levels
from convrec.ops.stack_dropout import StackDropout


class DownscaleOutput(NamedTuple):
    user: Tensor  # (B, D) mean over the last level's positions
    levels: list[Tensor]  # each level's output (B, L_l, D); empty unless asked for


PAPER_NORM_EPS = 1e-6


def paper_layer_norm(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float = PAPER_NORM_EPS
) -> Tensor:
    """The paper code's LayerNorm over the last dim: ``weight * (x - mean) / (std + eps) + bias``
    with the unbiased (n - 1) standard deviation and eps added to it, not to the variance.

    It differs from ``F.layer_norm`` (biased variance, eps inside the square root) by more than
    rounding, so a model that must reproduce the paper's weights needs this one.
    """
    centred = x - x.mean(-1, keepdim=True)
    std = (centred.square().sum(-1, keepdim=True) / (x.shape[-1] - 1)).sqrt()
    return torch.addcmul(bias, centred, weight * (1 / (std + eps)))


def level_mix(
    conv: Tensor,
    pooled: Tensor,
    residual: Tensor,
    p: LevelParams,
    level_mask: Tensor | None,
    dropout: StackDropout | None,
    level: int,
    eps: float,
    paper_norm: bool = False,
) -> Tensor:
    """The rest of level ``level`` after ``conv_pool``: Linear, GELU, dropout (``dropout``'s
    masks for that level; None = none), residual mix, LayerNorm (``paper_layer_norm`` with
    ``paper_norm``).

    Windows outside ``level_mask`` (mask-aware mode) are zeroed.
    """
    y = F.gelu(F.linear(conv, p.linear_weight, p.linear_bias))
    if dropout is not None:
        y = dropout.apply(y, level)
    mixed = y + p.alpha * pooled + p.beta * residual
    if paper_norm:
        x = paper_layer_norm(mixed, p.norm_weight, p.norm_bias, eps)
    else:
        x = F.layer_norm(mixed, (conv.shape[-1],), p.norm_weight, p.norm_bias, eps)
    if level_mask is not None:
        x = x * level_mask.unsqueeze(-1).to(x.dtype)
    return x


def mean_over_positions(x: Tensor, level_mask: Tensor | None) -> Tensor:
    """Mean over positions (B, L, D) -> (B, D), only over masked-in positions given a mask."""
    if level_mask is None:
        return x.mean(1)
    count = level_mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
    return (x * level_mask.unsqueeze(-1).to(x.dtype)).sum(1) / count


def downscale(
    x: Tensor,
    params: Sequence[LevelParams] | PackedLevels,
    strides: Sequence[int],
    heads: int,
    mask: Tensor | None = None,
    mask_aware: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    eps: float = 1e-5,
    return_levels: bool = False,
    residual: Tensor | None = None,
    backend: str = "reference",
    paper_norm: bool = False,
) -> DownscaleOutput:
    """Dispatch to the implementation ``backend`` selects (``convrec.ops.dispatch``).

    ``params``: one ``LevelParams`` per level, or the whole stack packed (``PackedLevels``, what
    ``ConvRecEncoder`` passes: the extension then reads it as one tensor and returns one
    gradient). Training-mode dropout draws one seed per call (``StackDropout``), so every
    backend drops the same elements for the same torch seed.

    "triton" runs the whole stack in one Triton launch per direction (``downscale_triton``);
    calls that return level outputs, or wider than its limit, run each level's ``conv_pool`` as
    a Triton kernel and the rest in PyTorch.
    "cpp" / "cuda" run the whole stack in the ``convrec._C`` extension (``downscale_ext``);
    with no levels there is nothing to fuse and the reference computes the position mean.
    ``paper_norm`` (the paper code's LayerNorm, ``paper_layer_norm``) runs on the reference
    and the extension; Triton lacks it ("auto" skips it, "triton" raises ``RuntimeError``).
    """
    packed = params if isinstance(params, PackedLevels) else None
    kernels = packed.kernels if packed else [p.conv_weight.shape[-1] for p in params]
    if len(kernels) != len(strides):
        raise ValueError(f"{len(kernels)} level parameter sets but {len(strides)} strides")
    backend = downscale_backend(backend, x.device, kernels, paper_norm)
    drop = StackDropout.draw(dropout, training, x.device, backend)
    if backend in ("cpp", "cuda") and kernels:
        packed = packed or pack_levels(params, heads)
        args = (x, packed, strides, mask, mask_aware, drop, eps, return_levels, residual)
        return DownscaleOutput(*downscale_extension(*args, paper_norm=paper_norm))
    whole_stack = whole_stack_problem(x.shape[1], x.shape[2], return_levels) is None
    if backend == "triton" and kernels and whole_stack:
        packed = packed or pack_levels(params, heads)
        args = (x, packed, strides, mask, mask_aware, drop, eps, residual)
        return DownscaleOutput(downscale_triton(*args), [])
    levels = packed.unpack() if packed else list(params)
    conv = functools.partial(conv_pool, backend="triton") if backend == "triton" else conv_pool
    return downscale_reference(
        x,
        levels,
        strides,
        heads,
        mask,
        mask_aware,
        drop,
        eps,
        return_levels,
        residual,
        conv,
        paper_norm,
    )


PAPER_NORM_TRITON = "the Triton path lacks the paper's LayerNorm (paper_norm=True)"


def downscale_backend(
    backend: str, device: torch.device, kernels: Sequence[int], paper_norm: bool = False
) -> str:
    """The implementation ``downscale`` runs for ``backend`` on ``device`` with these window
    sizes (Triton cannot take windows wider than ``dispatch.MAX_KERNEL``, nor ``paper_norm``)."""
    problem = PAPER_NORM_TRITON if paper_norm else kernel_size_problem(max([1, *kernels]))
    return resolve("downscale", backend, device, problem)


def downscale_reference(
    x: Tensor,
    params: Sequence[LevelParams],
    strides: Sequence[int],
    heads: int,
    mask: Tensor | None = None,
    mask_aware: bool = False,
    dropout: StackDropout | None = None,
    eps: float = 1e-5,
    return_levels: bool = False,
    residual: Tensor | None = None,
    conv_pool_fn: Callable[..., ConvPoolOutput] = conv_pool,
    paper_norm: bool = False,
) -> DownscaleOutput:
    """Run every level on ``x`` (B, L, D) and read out the user vector (B, D).

    ``mask`` (B, L) bool (True = real item) zeroes padded inputs first. With ``mask_aware`` the
    pools and the position mean average only over real positions and windows with no real position
    are zeroed at every level, so prepending padding changes nothing; otherwise (the paper's
    behaviour) padding counts as zeros in every average. Kernel sizes come from the conv weights.
    ``dropout`` (None = none) gives each level's dropout masks. ``residual`` (B, L, D) is the long
    residual entering the first level given (default: x), which lets the stack continue after a
    first level computed elsewhere (the fused kernel); with no levels the result is the position
    mean of ``x``. ``paper_norm`` normalises every level with ``paper_layer_norm`` instead of
    ``F.layer_norm``.
    """
    if mask is not None:
        x = x * mask.unsqueeze(-1).to(x.dtype)
    level_mask = mask if mask_aware else None
    residual = x if residual is None else residual
    outputs = []
    for level, (p, stride) in enumerate(zip(params, strides, strict=True)):
        conv, pooled, residual, level_mask = conv_pool_fn(
            x, residual, p.conv_weight, p.conv_bias, stride, heads, level_mask
        )
        x = level_mix(conv, pooled, residual, p, level_mask, dropout, level, eps, paper_norm)
        if return_levels:
            outputs.append(x)
    return DownscaleOutput(mean_over_positions(x, level_mask), outputs)
