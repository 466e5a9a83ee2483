"""``gelu_paper_norm``: ``paper_layer_norm(dropout(GELU(x)))`` over the last dim.

It is the normalisation of the paper code's input block (``FaithfulItemEncoder``), run on
every history position and candidate. The reference composes PyTorch ops, about a dozen passes
each way over the (positions, D + 3) tensor: at L = 2,048 it was the largest cost of the
faithful model's CPU step after the GEMMs. "cpp" / "cuda" (``convrec._C``,
``csrc/gelu_paper_norm.h``) make one pass each way: the forward saves the mean and 1 / (std +
eps) of each row, the backward recomputes GELU and the dropout factors from x.

Dropout is ``StackDropout`` level 0 over x's rows (its leading dimensions flattened), so every
backend drops the same elements for the same seed. Inputs whose dtype differs from the
parameters' (autocast) are computed in the promoted dtype, as the reference's ops promote.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from convrec.ops.dispatch import EXTENSION_DTYPES, extension_status, resolve
from convrec.ops.downscale import PAPER_NORM_EPS, paper_layer_norm
from convrec.ops.stack_dropout import StackDropout


def gelu_paper_norm_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float = PAPER_NORM_EPS,
    dropout: StackDropout | None = None,
) -> Tensor:
    """The oracle: ``paper_layer_norm`` of ``GELU(x)`` after ``dropout`` (None: none)."""
    u = F.gelu(x)
    if dropout is not None:
        u = dropout.apply(u, 0)
    return paper_layer_norm(u, weight, bias, eps)


def gelu_paper_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float = PAPER_NORM_EPS,
    dropout: StackDropout | None = None,
    backend: str = "auto",
) -> Tensor:
    """``paper_layer_norm(dropout(GELU(x)), weight, bias, eps)`` for x (..., D), D >= 2, with
    (D,) ``weight`` and ``bias``, on ``backend`` (``convrec.ops.dispatch``)."""
    if x.shape[-1] < 2:
        raise ValueError(
            f"gelu_paper_norm needs at least 2 channels, got x of shape {tuple(x.shape)}"
        )
    if weight.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
        raise ValueError(
            f"gelu_paper_norm: weight and bias must have shape ({x.shape[-1]},), got "
            f"{tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    if resolve("gelu_paper_norm", backend, x.device) == "reference":
        return gelu_paper_norm_reference(x, weight, bias, eps, dropout)
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), bias.dtype)
    if dtype not in EXTENSION_DTYPES[x.device.type]:
        return gelu_paper_norm_reference(x, weight, bias, eps, dropout)
    seed, p = (None, 0.0) if dropout is None else (dropout.seed, dropout.p)
    y, _ = torch.ops.convrec.gelu_paper_norm(
        x.to(dtype), weight.to(dtype), bias.to(dtype), seed, p, eps
    )
    return y


def _register_extension_op() -> None:
    """Fake and autograd implementations of ``convrec::gelu_paper_norm`` (C++ schema)."""

    @torch.library.register_fake("convrec::gelu_paper_norm")
    def _(x, weight, bias, dropout_seed, dropout, eps):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        rows = x.numel() // x.shape[-1]
        return torch.empty_like(x), x.new_empty(rows, 2, dtype=acc)

    @torch.library.register_fake("convrec::gelu_paper_norm_backward")
    def _(grad_y, x, weight, stats, dropout_seed, dropout, eps):
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)

    def setup_context(ctx, inputs, output) -> None:
        x, weight, _, seed, p, eps = inputs
        ctx.p, ctx.eps = p, eps
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, weight, output[1], seed)

    def backward(ctx, grad_y, _grad_stats):
        x, weight, stats, seed = ctx.saved_tensors
        grads = torch.ops.convrec.gelu_paper_norm_backward(
            grad_y.contiguous(), x, weight, stats, seed, ctx.p, ctx.eps
        )
        return (*grads, None, None, None)

    torch.library.register_autograd(
        "convrec::gelu_paper_norm", backward, setup_context=setup_context
    )


if extension_status() is None:
    _register_extension_op()
