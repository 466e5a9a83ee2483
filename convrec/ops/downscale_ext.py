"""The C++/CUDA ``downscale`` op of ``convrec._C``: its fake and autograd registrations and the
call ``downscale(..., backend="cpp" | "cuda")`` makes.

The schemas live in C++ (``csrc/downscale_ops.cpp``); this module adds what Python owns:

- Folding. A level's grouped Conv1d and its Linear have nothing between them, so the op takes
  one (k·D, D) matrix and one bias per level and runs a single GEMM per level. The folding is
  done here with differentiable torch ops, so autograd carries the op's weight gradients back
  to the conv and Linear parameters (and the same ``state_dict`` serves every backend). For
  heads > 1 the folded matrix is block-structured and the GEMM does k·D² multiply-adds per
  window instead of k·D²/H + D².
- Dropout. Training-mode masks are drawn here, level by level, with ``F.dropout`` on ones of the
  level's shape and dtype: the same draws, in the same order, as the reference's ``F.dropout``,
  so one seed gives both backends the same masks. They reach the op as bool tensors.
- Autograd. The forward op returns the tensors its backward needs (window matrices,
  pre-activations, pools, LayerNorm statistics); ``setup_context`` saves them, so they show up
  in ``saved_tensors_hooks`` like any autograd buffer. Where level 0's windows tile x exactly
  (kernel == stride, no padding) the op reads x in place and x itself is saved instead of a
  copy (``first_level_in_place``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from convrec.ops.dispatch import extension_status
from convrec.schedule import level_geometry

SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}


def fold_level(
    conv_weight: Tensor, conv_bias: Tensor, linear_weight: Tensor, linear_bias: Tensor, heads: int
) -> tuple[Tensor, Tensor]:
    """(k·D, D) matrix and (D,) bias with ``window @ W + b == Linear(GroupedConv(window))``.

    A window row is the k positions of the window, D channels each, oldest first. Computed in
    float32 for half-precision weights, then rounded once.
    """
    d, head_dim, kernel = conv_weight.shape
    dtype = conv_weight.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = conv_weight.to(compute)
    if heads == 1:
        conv = w.permute(2, 1, 0).reshape(kernel * d, d)  # [j, c_in, c_out]
    else:
        eye = torch.eye(heads, dtype=compute, device=w.device)
        blocks = w.view(heads, head_dim, head_dim, kernel)  # [group, out, in, j]
        conv = torch.einsum("hg,gqij->jhigq", eye, blocks).reshape(kernel * d, d)
    linear = linear_weight.to(compute)
    weight = conv @ linear.T
    bias = F.linear(conv_bias.to(compute), linear, linear_bias.to(compute))
    return weight.to(dtype), bias.to(dtype)


def dropout_masks(
    x: Tensor, windows: Sequence[int], p: float, training: bool
) -> tuple[list[Tensor], float]:
    """Per-level bool keep masks (B, L_l, D) and the 1 / (1 - p) scale; none outside training."""
    if not training or p == 0.0:
        return [], 1.0
    batch, _, d = x.shape
    masks = [
        F.dropout(x.new_ones(batch, n, d), p, True) != 0  # same RNG use as the reference
        for n in windows
    ]
    return masks, (0.0 if p >= 1.0 else 1.0 / (1.0 - p))


def check_inputs(
    x: Tensor,
    params: Sequence[Any],
    strides: Sequence[int],
    heads: int,
    mask: Tensor | None,
    residual: Tensor | None,
) -> None:
    """Raise TypeError / ValueError naming the tensor before the op sees it (the dispatch has
    already matched the backend to the device)."""
    allowed = SUPPORTED_DTYPES.get(x.device.type, ())
    if x.dtype not in allowed:
        names = ", ".join(str(t) for t in allowed) or "no dtype"
        raise TypeError(
            f"the downscale extension supports {names} on {x.device.type}, got x of {x.dtype}; "
            'use backend="reference" for this dtype'
        )
    if x.dim() != 3 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must be a non-empty (B, L, D) tensor, got {tuple(x.shape)}")
    d = x.shape[2]
    if heads < 1 or d % heads != 0:
        raise ValueError(f"D={d} is not divisible by heads={heads}")
    for level, (p, stride) in enumerate(zip(params, strides, strict=True)):
        kernel = p.conv_weight.shape[-1] if p.conv_weight.dim() == 3 else -1
        expected = {
            "conv_weight": (d, d // heads, kernel),
            "conv_bias": (d,),
            "linear_weight": (d, d),
            "linear_bias": (d,),
            "alpha": (),
            "beta": (),
            "norm_weight": (d,),
            "norm_bias": (d,),
        }
        for name, shape in expected.items():
            t = getattr(p, name)
            if tuple(t.shape) != shape or kernel < 1:
                raise ValueError(
                    f"level {level} {name} must have shape {shape}, got {tuple(t.shape)}"
                )
            if t.dtype != x.dtype:
                raise TypeError(f"level {level} {name} has dtype {t.dtype} but x has {x.dtype}")
            if t.device != x.device:
                raise ValueError(f"level {level} {name} is on {t.device} but x is on {x.device}")
        if not 1 <= stride <= kernel:
            raise ValueError(f"level {level}: need 1 <= stride <= kernel, got {stride}, {kernel}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:2]):
        raise TypeError(
            f"mask must be a bool tensor of shape {tuple(x.shape[:2])}, got {mask.dtype} "
            f"{tuple(mask.shape)}"
        )
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual must match x {tuple(x.shape)} {x.dtype}, got {tuple(residual.shape)} "
            f"{residual.dtype}"
        )


def first_level_in_place(
    kernel: int, stride: int, pad: int, x: Tensor, mask: Tensor | None
) -> bool:
    """Whether level 0 reads x in place: the C++ rule (``first_level_in_place`` in
    ``csrc/downscale_driver.h``), which fixes the shape of the saved window matrix."""
    return kernel == stride and pad == 0 and (x.device.type == "cpu" or mask is None)


def downscale_extension(
    x: Tensor,
    params: Sequence[Any],
    strides: Sequence[int],
    heads: int,
    mask: Tensor | None,
    mask_aware: bool,
    dropout: float,
    training: bool,
    eps: float,
    return_levels: bool,
    residual: Tensor | None,
) -> tuple[Tensor, list[Tensor]]:
    """User vectors (B, D) and, with ``return_levels``, every level's output (see
    ``convrec.ops.downscale.downscale_reference`` for the semantics), on the tensors' device."""
    check_inputs(x, params, strides, heads, mask, residual)
    kernels = [int(p.conv_weight.shape[-1]) for p in params]
    folded = [
        fold_level(p.conv_weight, p.conv_bias, p.linear_weight, p.linear_bias, heads)
        for p in params
    ]
    windows = [n for _, n in level_geometry(x.shape[1], list(zip(kernels, strides, strict=True)))]
    keep, scale = dropout_masks(x, windows, dropout, training)
    user, levels, _ = torch.ops.convrec.downscale(
        x,
        residual,
        mask,
        [w for w, _ in folded],
        torch.stack([b for _, b in folded]),
        torch.stack([p.alpha for p in params]),
        torch.stack([p.beta for p in params]),
        torch.stack([p.norm_weight for p in params]),
        torch.stack([p.norm_bias for p in params]),
        kernels,
        [int(s) for s in strides],
        mask_aware and mask is not None,
        keep,
        scale,
        eps,
        return_levels,
    )
    return user, (list(levels) if return_levels else [])


def _register() -> None:
    """Fake (shape) and autograd implementations of the C++ ops."""

    @torch.library.register_fake("convrec::downscale")
    def _(
        x,
        residual,
        mask,
        weight,
        bias,
        alpha,
        beta,
        norm_weight,
        norm_bias,
        kernels,
        strides,
        mask_aware,
        dropout_keep,
        dropout_scale,
        eps,
        return_levels,
    ):
        batch, length, d = x.shape
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        geometry = level_geometry(length, list(zip(kernels, strides, strict=True)))
        in_place = first_level_in_place(kernels[0], strides[0], geometry[0][0], x, mask)
        levels, saved = [], []
        for level, (kernel, (_, n)) in enumerate(zip(kernels, geometry, strict=True)):
            window_matrix = (0,) if level == 0 and in_place else (batch, n, kernel, d)
            # level 0 without a residual pools x twice; the one copy is saved as "pooled"
            res_pooled = (0,) if level == 0 and residual is None else (batch, n, d)
            saved += [
                x.new_empty(window_matrix),
                x.new_empty(batch * n, d),
                x.new_empty(batch, n, d),
                x.new_empty(res_pooled),
                x.new_empty(batch * n, 3, dtype=acc),
                x.new_empty(batch if mask_aware else 0, n, dtype=torch.bool),
            ]
            if return_levels or level == len(kernels) - 1:
                levels.append(x.new_empty(batch, n, d))
        saved.append(x.new_empty(batch, dtype=acc))
        return x.new_empty(batch, d), levels, saved

    @torch.library.register_fake("convrec::downscale_backward")
    def _(
        grad_user,
        grad_levels,
        x,
        mask,
        weight,
        alpha,
        beta,
        norm_weight,
        kernels,
        strides,
        mask_aware,
        has_residual,
        dropout_keep,
        dropout_scale,
        length,
        saved,
    ):
        batch, d = grad_user.shape
        m = len(weight)
        new = grad_user.new_empty
        return (
            new(batch, length, d),
            new(batch if has_residual else 0, length, d),
            [w.new_empty(w.shape) for w in weight],
            new(m, d),
            new(m),
            new(m),
            new(m, d),
            new(m, d),
        )

    def setup_context(ctx, inputs, output) -> None:
        (
            x,
            residual,
            mask,
            weight,
            _,
            alpha,
            beta,
            norm_weight,
            _,
            kernels,
            strides,
            mask_aware,
            keep,
            scale,
            _,
            return_levels,
        ) = inputs
        ctx.config = (kernels, strides, mask_aware, residual is not None, scale, x.shape[1])
        ctx.counts = (mask is not None, len(weight), len(keep), return_levels)
        ctx.set_materialize_grads(False)  # no zero gradients for the saved outputs
        ctx.mark_non_differentiable(*output[2])
        ctx.needs_x = output[2][0].numel() == 0  # level 0 read x in place
        extra = ([] if mask is None else [mask]) + ([x] if ctx.needs_x else [])
        ctx.save_for_backward(*extra, *weight, alpha, beta, norm_weight, *keep, *output[2])

    def backward(ctx, grad_user, grad_levels, _grad_saved):
        kernels, strides, mask_aware, has_residual, scale, length = ctx.config
        has_mask, m, n_keep, return_levels = ctx.counts
        saved = list(ctx.saved_tensors)
        mask = saved.pop(0) if has_mask else None
        x = saved.pop(0) if ctx.needs_x else None
        weight, saved = saved[:m], saved[m:]
        alpha, beta, norm_weight, *saved = saved
        keep, saved = saved[:n_keep], saved[n_keep:]
        if grad_user is None:
            grad_user = norm_weight.new_zeros(saved[-1].shape[0], norm_weight.shape[1])
        given = list(grad_levels) if return_levels else [None] * (m - 1) + list(grad_levels)
        empty = norm_weight.new_empty(0)
        levels = [] if all(g is None for g in given) else [empty if g is None else g for g in given]
        gx, gres, gw, gb, ga, gbt, gnw, gnb = torch.ops.convrec.downscale_backward(
            grad_user,
            levels,
            empty if x is None else x,
            mask,
            weight,
            alpha,
            beta,
            norm_weight,
            kernels,
            strides,
            mask_aware,
            has_residual,
            keep,
            scale,
            length,
            saved,
        )
        gres = gres if has_residual else None
        no_keep = [None] * n_keep
        return (
            gx,
            gres,
            None,
            gw,
            gb,
            ga,
            gbt,
            gnw,
            gnb,
            None,
            None,
            None,
            no_keep,
            None,
            None,
            None,
        )

    torch.library.register_autograd("convrec::downscale", backward, setup_context=setup_context)


if extension_status() is None:
    _register()
