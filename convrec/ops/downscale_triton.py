"""The whole-stack Triton ``downscale``: two custom ops (forward, backward) around the kernels of
``convrec.ops.triton.downscale``, with fake and autograd implementations.

``downscale(..., backend="triton")`` runs the whole level stack through here, so a forward and
backward dispatch a handful of ops whatever the number of levels (``tests/
test_dispatch_count.py``): the packed parameters go in whole and one packed gradient comes out,
the dropout keep decisions are recomputed from the call's seed. Level outputs are not returned
(``return_levels`` takes the per-level path, which runs each level's ``conv_pool`` in Triton),
and D is limited to ``MAX_WIDTH`` (every channel of a tile lives in registers).

Under ``torch.autocast`` on CUDA the op runs in the autocast dtype, as the extension does (x,
residual and the packed parameters cast; fp32 accumulation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from convrec.ops.dispatch import triton_kernels
from convrec.ops.downscale_ext import autocast_inputs, check_inputs, stack_op_args
from convrec.ops.level_params import PackedLevels
from convrec.ops.stack_dropout import StackDropout

MAX_WIDTH = 256  # widest D the whole-stack kernels take (triton/downscale.py)
# Bound on L * (D + 2): a batch row's workspaces (at most ~3 L D + 3 L elements) keep int32 offsets.
MAX_ROW_ELEMENTS = (1 << 31) // 4

# Dtypes of the whole-stack kernels per device type (the interpreter computes bf16 wrongly).
TRITON_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}


def whole_stack_problem(length: int, d: int, return_levels: bool) -> str | None:
    """Why a call must take the per-level Triton path instead of the whole-stack kernels."""
    if return_levels:
        return "the whole-stack kernels return no level outputs"
    if d > MAX_WIDTH:
        return f"D={d} exceeds the whole-stack kernels' limit of {MAX_WIDTH}"
    if MAX_ROW_ELEMENTS // (d + 2) < length:
        return f"L={length} is too long for the whole-stack kernels' int32 row offsets"
    return None


def downscale_triton(
    x: Tensor,
    packed: PackedLevels,
    strides: Sequence[int],
    mask: Tensor | None,
    mask_aware: bool,
    dropout: StackDropout | None,
    eps: float,
    residual: Tensor | None,
) -> Tensor:
    """User vectors (B, D) of the whole stack (semantics of
    ``convrec.ops.downscale.downscale_reference``)."""
    x, packed, residual = autocast_inputs(x, packed, residual)
    check_inputs(x, packed, strides, mask, residual, TRITON_DTYPES, "the Triton downscale")
    args = stack_op_args(x, packed, strides, mask, mask_aware, dropout, eps, residual)
    user, _, _ = torch.ops.convrec.downscale_triton(*args)
    return user


@torch.library.custom_op("convrec::downscale_triton", mutates_args=())
def _forward_op(
    x: Tensor,
    residual: Tensor | None,
    mask: Tensor | None,
    params: Tensor,
    kernels: list[int],
    strides: list[int],
    heads: int,
    mask_aware: bool,
    dropout_seed: Tensor | None,
    dropout: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(user, workspace, folded weights); the last two are saved for the backward."""
    kernels_module = triton_kernels("downscale")
    return kernels_module.stack_forward(
        x, residual, mask, params, kernels, strides, heads, mask_aware, dropout_seed, dropout, eps
    )


@_forward_op.register_fake
def _(x, residual, mask, params, kernels, strides, heads, mask_aware, dropout_seed, dropout, eps):
    module = triton_kernels("downscale")
    batch, length, d = x.shape
    layout = module.stack_layout(length, tuple(kernels), tuple(strides), d, heads)
    acc = module.acc_dtype(x.dtype)
    return (
        x.new_empty(batch, d),
        x.new_empty(batch, layout.forward_row, dtype=acc),
        x.new_empty(layout.fold_size, dtype=acc),
    )


@torch.library.custom_op("convrec::downscale_triton_backward", mutates_args=())
def _backward_op(
    grad_user: Tensor,
    x: Tensor,
    residual: Tensor | None,
    mask: Tensor | None,
    params: Tensor,
    fold: Tensor,
    workspace: Tensor,
    kernels: list[int],
    strides: list[int],
    heads: int,
    mask_aware: bool,
    dropout_seed: Tensor | None,
    dropout: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of x, of the residual ((0,) without one) and of the packed parameters."""
    grad_x, grad_res, grad_params = triton_kernels("downscale").stack_backward(
        grad_user,
        x,
        residual,
        mask,
        params,
        fold,
        workspace,
        kernels,
        strides,
        heads,
        mask_aware,
        dropout_seed,
        dropout,
        eps,
    )
    return grad_x, x.new_empty(0) if grad_res is None else grad_res, grad_params


@_backward_op.register_fake
def _(grad_user, x, residual, mask, params, fold, workspace, kernels, strides, heads, *rest):
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    grad_res = x.new_empty(0) if residual is None else torch.empty_like(grad_x)
    return grad_x, grad_res, torch.empty_like(params)


def _setup_context(ctx, inputs, output) -> None:
    x, residual, mask, params, kernels, strides, heads, mask_aware, seed, dropout, eps = inputs
    _, workspace, fold = output
    ctx.config = (kernels, strides, heads, mask_aware, dropout, eps)
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(workspace, fold)
    ctx.save_for_backward(x, residual, mask, params, fold, workspace, seed)


def _backward(ctx, grad_user: Tensor, _grad_workspace: Tensor, _grad_fold: Tensor):
    x, residual, mask, params, fold, workspace, seed = ctx.saved_tensors
    kernels, strides, heads, mask_aware, dropout, eps = ctx.config
    grad_x, grad_res, grad_params = torch.ops.convrec.downscale_triton_backward(
        grad_user, x, residual, mask, params, fold, workspace, kernels, strides, heads,
        mask_aware, seed, dropout, eps,
    )  # fmt: skip
    grad_res = grad_res if ctx.has_residual else None
    return grad_x, grad_res, None, grad_params, *[None] * 7


_forward_op.register_autograd(_backward, setup_context=_setup_context)
