"""The C++/CUDA ``downscale`` op of ``convrec._C``: its fake, autograd and autocast
registrations and the call ``downscale(..., backend="cpp" | "cuda")`` makes.

The schemas live in C++ (``csrc/downscale_ops.cpp``); this module adds what Python owns. The
op takes the stack's parameters packed in one tensor (``convrec.ops.level_params``): it folds
each level's grouped conv and Linear into one GEMM weight itself, draws dropout from a seed
(``convrec.ops.stack_dropout``) inside its kernels and returns one gradient for the packed
tensor, so a forward and backward on a packed stack are a handful of dispatched ops whatever
the number of levels (``tests/test_dispatch_count.py`` counts them).

Autograd: the forward op returns the tensors its backward needs (window matrices,
pre-activations, pools, LayerNorm statistics); ``setup_context`` saves them, so they show up in
``saved_tensors_hooks`` like any autograd buffer. Where level 0's windows tile x exactly
(kernel == stride, no padding) the op reads x in place and x itself is saved instead of a copy
(``first_level_in_place``). Under ``torch.autocast`` on CUDA the op runs in the autocast dtype
(x, residual and the packed parameters cast to it, as autocast does for a matmul; the packed
gradient flows back through the cast in the parameters' dtype); on CPU it runs in the inputs'
dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from convrec.ops.dispatch import EXTENSION_DTYPES, extension_status
from convrec.ops.level_params import PackedLevels, check_packed
from convrec.ops.stack_dropout import StackDropout
from convrec.schedule import level_geometry


def check_inputs(
    x: Tensor,
    packed: PackedLevels,
    strides: Sequence[int],
    mask: Tensor | None,
    residual: Tensor | None,
    dtypes: dict[str, tuple[torch.dtype, ...]] = EXTENSION_DTYPES,
    op: str = "the downscale extension",
) -> None:
    """Raise TypeError / ValueError naming the tensor before ``op`` sees it (the dispatch has
    already matched the backend to the device); ``dtypes``: what ``op`` takes per device type."""
    allowed = dtypes.get(x.device.type, ())
    if x.dtype not in allowed:
        names = ", ".join(str(t) for t in allowed) or "no dtype"
        raise TypeError(
            f"{op} supports {names} on {x.device.type}, got x of {x.dtype}; "
            'use backend="reference" for this dtype'
        )
    if x.dim() != 3 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must be a non-empty (B, L, D) tensor, got {tuple(x.shape)}")
    if x.shape[2] != packed.d or packed.heads < 1 or packed.d % packed.heads != 0:
        raise ValueError(
            f"x has width {x.shape[2]} but the levels D={packed.d}, heads={packed.heads}"
        )
    check_packed(packed)
    if packed.flat.dtype != x.dtype:
        raise TypeError(f"the level parameters have dtype {packed.flat.dtype} but x has {x.dtype}")
    if packed.flat.device != x.device:
        raise ValueError(f"the level parameters are on {packed.flat.device} but x is on {x.device}")
    for level, (kernel, stride) in enumerate(zip(packed.kernels, strides, strict=True)):
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


def autocast_inputs(
    x: Tensor, packed: PackedLevels, residual: Tensor | None
) -> tuple[Tensor, PackedLevels, Tensor | None]:
    """Under ``torch.autocast`` on CUDA, x, the residual and the packed parameters in the
    autocast dtype, as autocast runs a matmul (the parameters' gradient flows back through the
    cast); otherwise unchanged. The whole-stack ops run in their inputs' dtype."""
    if x.device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return x, packed, residual
    dtype = torch.get_autocast_dtype("cuda")
    residual = None if residual is None else residual.to(dtype)
    return x.to(dtype), packed._replace(flat=packed.flat.to(dtype)), residual


def first_level_in_place(
    kernel: int, stride: int, pad: int, x: Tensor, mask: Tensor | None
) -> bool:
    """Whether level 0 reads x in place: the C++ rule (``first_level_in_place`` in
    ``csrc/downscale_driver.h``), which fixes the shape of the saved window matrix."""
    return kernel == stride and pad == 0 and (x.device.type == "cpu" or mask is None)


def downscale_extension(
    x: Tensor,
    packed: PackedLevels,
    strides: Sequence[int],
    mask: Tensor | None,
    mask_aware: bool,
    dropout: StackDropout | None,
    eps: float,
    return_levels: bool,
    residual: Tensor | None,
    paper_norm: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """User vectors (B, D) and, with ``return_levels``, every level's output (see
    ``convrec.ops.downscale.downscale_reference`` for the semantics), on the tensors' device."""
    x, packed, residual = autocast_inputs(x, packed, residual)
    check_inputs(x, packed, strides, mask, residual)
    if paper_norm and x.shape[2] < 2:
        raise ValueError("the paper's LayerNorm (paper_norm=True) needs D >= 2")
    args = stack_op_args(x, packed, strides, mask, mask_aware, dropout, eps, residual)
    user, levels, _ = torch.ops.convrec.downscale(*args, paper_norm, return_levels)
    return user, (list(levels) if return_levels else [])


def stack_op_args(
    x: Tensor,
    packed: PackedLevels,
    strides: Sequence[int],
    mask: Tensor | None,
    mask_aware: bool,
    dropout: StackDropout | None,
    eps: float,
    residual: Tensor | None,
) -> tuple:
    """The leading arguments both whole-stack ops take (``convrec.downscale`` here and
    ``convrec.downscale_triton``): x, residual, mask, the packed tensor, kernels, strides,
    heads, mask-aware, dropout seed and rate, eps."""
    return (
        x,
        residual,
        mask,
        packed.flat,
        list(packed.kernels),
        [int(s) for s in strides],
        packed.heads,
        mask_aware and mask is not None,
        None if dropout is None else dropout.seed,
        0.0 if dropout is None else dropout.p,
        eps,
    )


def _register() -> None:
    """Fake (shape) and autograd implementations of the C++ ops."""

    @torch.library.register_fake("convrec::downscale")
    def _(
        x,
        residual,
        mask,
        params,
        kernels,
        strides,
        heads,
        mask_aware,
        dropout_seed,
        dropout,
        eps,
        paper_norm,
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
        params,
        kernels,
        strides,
        heads,
        mask_aware,
        has_residual,
        dropout_seed,
        dropout,
        eps,
        paper_norm,
        length,
        saved,
    ):
        batch, d = saved[-1].shape[0], saved[2].shape[-1]
        new = params.new_empty
        return (
            new(batch, length, d),
            new(batch if has_residual else 0, length, d),
            new(params.shape),
        )

    def setup_context(ctx, inputs, output) -> None:
        x, residual, mask, params, kernels, strides, heads, mask_aware, seed, *rest = inputs
        p, eps, paper, levels = rest
        has_residual = residual is not None
        ctx.config = (kernels, strides, heads, mask_aware, has_residual, p, eps, paper, x.shape[1])
        ctx.return_levels = levels
        ctx.set_materialize_grads(False)  # no zero gradients for the saved outputs
        ctx.mark_non_differentiable(*output[2])
        ctx.needs_x = output[2][0].numel() == 0  # level 0 read x in place
        ctx.save_for_backward(x if ctx.needs_x else None, mask, params, seed, *output[2])

    def backward(ctx, grad_user, grad_levels, _grad_saved):
        kernels, strides, heads, mask_aware, has_residual, p, eps, paper, length = ctx.config
        x, mask, params, seed, *saved = ctx.saved_tensors
        m = len(kernels)
        given = list(grad_levels) if ctx.return_levels else [None] * (m - 1) + list(grad_levels)
        if all(g is None for g in given):
            levels = []
        else:  # placeholders only when some level output has a gradient
            empty = params.new_empty(0)
            levels = [empty if g is None else g for g in given]
        gx, gres, gparams = torch.ops.convrec.downscale_backward(
            grad_user,
            levels,
            x,
            mask,
            params,
            kernels,
            strides,
            heads,
            mask_aware,
            has_residual,
            seed,
            p,
            eps,
            paper,
            length,
            saved,
        )
        gres = gres if has_residual else None
        return gx, gres, None, gparams, *[None] * 9

    torch.library.register_autograd("convrec::downscale", backward, setup_context=setup_context)


if extension_status() is None:
    _register()
