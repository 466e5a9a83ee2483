"""The C++/CUDA ``stream_downscale`` op of ``convrec._C``: its fake, autograd and autocast
registrations and the call ``stream_downscale(..., backend="cpp" | "cuda")`` makes.

The op is the anchored stack on left-aligned histories (``stream_positions_reference``): it
takes the stack packed in one tensor, folds each level's conv and Linear itself, draws
dropout from the call's seed inside its kernels (the masks ``StackDropout`` gives the
reference) and returns one gradient for the packed tensor. Per level it is one batched GEMM
over the positions grouped by window offset plus row passes that add at most ``stride`` terms
per position, so the work is O(L · levels) like the reference's, without its per-level
(B, L, D) temporaries for gathers, prefix sums and masks (``csrc/stream_downscale.h``).

``newest_last`` (the open window's elements in its last slots) replaces the packing by GEMMs
of every position's open term with the last offset's weight and, per offset, of the final
versions of the window places that are read at that offset (``ClosedLayout``), whose terms the
row passes pick by the offset each position reads.

Autograd: the forward returns what its backward needs (each level's slot-packed input, or its
input with ``newest_last``, pre-activations, pools and statistics); ``setup_context`` saves
them. Under
``torch.autocast`` on CUDA the op runs in the autocast dtype, as ``downscale_extension`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from convrec.ops.dispatch import extension_status
from convrec.ops.downscale_ext import check_inputs
from convrec.ops.level_params import PackedLevels
from convrec.ops.stack_dropout import StackDropout


def stream_downscale_extension(
    x: Tensor,
    packed: PackedLevels,
    strides: Sequence[int],
    mask_aware: bool,
    dropout: StackDropout | None,
    eps: float,
    newest_last: bool = False,
) -> Tensor:
    """(B, L, D): slot t the user vector after event t of the left-aligned histories ``x``
    (B, L, D); slots past a history's end are to be dropped by the caller. Kernel = stride at
    every level (``check_stream_levels``); ``newest_last`` the open windows' layout."""
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        x = x.to(dtype)
        packed = packed._replace(flat=packed.flat.to(dtype))
    check_inputs(x, packed, strides, None, None)
    positions, _ = torch.ops.convrec.stream_downscale(
        x,
        packed.flat,
        [int(s) for s in strides],
        packed.heads,
        mask_aware,
        None if dropout is None else dropout.seed,
        0.0 if dropout is None else dropout.p,
        eps,
        newest_last,
    )
    return positions


def _register() -> None:
    """Fake (shape) and autograd implementations of the C++ ops."""

    @torch.library.register_fake("convrec::stream_downscale")
    def _(x, params, strides, heads, mask_aware, dropout_seed, dropout, eps, newest_last):
        batch, length, d = x.shape
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        saved, span = [], 1
        for level, stride in enumerate(strides):
            blocks = -(-length // (span * stride))
            saved += [
                x.new_empty(batch, length, d)  # newest_last: the level input
                if newest_last
                else x.new_empty(stride, batch * blocks * span, d),
                x.new_empty(batch * length, d),
                x.new_empty(batch, length, d),
                x.new_empty((0,) if level == 0 else (batch, length, d)),  # level 0: the pools
                x.new_empty(batch * length, 3, dtype=acc),
            ]
            span *= stride
        return x.new_empty(batch, length, d), saved

    @torch.library.register_fake("convrec::stream_downscale_backward")
    def _(grad, params, strides, heads, dropout_seed, dropout, eps, newest_last, saved):
        return grad.new_empty(grad.shape), params.new_empty(params.shape)

    def setup_context(ctx, inputs, output) -> None:
        _, params, strides, heads, _, seed, p, eps, newest_last = inputs
        ctx.config = (strides, heads, p, eps, newest_last)
        ctx.set_materialize_grads(False)  # no zero gradients for the saved outputs
        ctx.mark_non_differentiable(*output[1])
        ctx.save_for_backward(params, seed, *output[1])

    def backward(ctx, grad, _grad_saved):
        strides, heads, p, eps, newest_last = ctx.config
        params, seed, *saved = ctx.saved_tensors
        if grad is None:
            return (None,) * 9
        op = torch.ops.convrec.stream_downscale_backward
        gx, gparams = op(
            grad.contiguous(), params, strides, heads, seed, p, eps, newest_last, saved
        )
        return gx, gparams, *[None] * 7

    torch.library.register_autograd(
        "convrec::stream_downscale", backward, setup_context=setup_context
    )


if extension_status() is None:
    _register()
