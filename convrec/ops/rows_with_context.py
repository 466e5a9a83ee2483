"""``rows_with_context``: the faithful item encoder's per-position fused vectors,
``drop(table[where] + context @ weight.T)``: a row of a per-id table (the fused attribute
vector of each distinct id of a call), plus the product of the position's date context, with
``StackDropout``'s level-0 mask over the (N, W) result (the paper code drops each position's
fused vector on its own). Composed of torch ops (the reference) the forward is a gather,
``addmm``'s copy and (K = 6) product, and a dropout pass over the (N, W) tensor. "cpp" is the
op ``convrec::rows_with_context`` (``csrc/rows_with_context.h``), one pass forward; its backward
is the dropout pass (``stack_dropout``), the table's gradient by ``embedding_rows_backward``
(memset, rows added in position order) and one GEMM for the weight's gradient. CUDA tensors,
a context broadcast over positions and other dtypes take the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from convrec.ops.dispatch import EXTENSION_DTYPES, extension_status, resolve
from convrec.ops.gather_embed import rows_at
from convrec.ops.stack_dropout import StackDropout


def add_context(x: Tensor, context: Tensor | None, weight: Tensor) -> Tensor:
    """``x + context @ weight.T`` for x (*, W) and context (*, K) or broadcastable to it.

    One position per row: ``addmm`` with the (K, W) factor on the right, whose weight gradient
    ``context.T @ grad`` is a short-wide product (a tall-skinny ``grad.T @ context``, what
    ``F.linear`` would compute, runs an order of magnitude slower on CPU BLAS)."""
    if context is None:
        return x
    context = context.to(x.dtype)
    if context.shape[:-1] != x.shape[:-1]:  # shared by many rows: project once, broadcast
        return x + context @ weight.T
    # a contiguous right factor: autograd then computes its gradient as context.T @ grad
    right = weight.T.contiguous()
    flat = torch.addmm(x.reshape(-1, x.shape[-1]), context.reshape(-1, context.shape[-1]), right)
    return flat.view(x.shape)


def rows_with_context_reference(
    table: Tensor,
    where: Tensor,
    context: Tensor | None,
    weight: Tensor,
    drop: StackDropout | None = None,
) -> Tensor:
    """The oracle: gather, ``add_context``, then ``drop.apply(..., level 0)``."""
    x = add_context(rows_at(table, where), context, weight)
    return x if drop is None else drop.apply(x, 0)


def rows_with_context(
    table: Tensor,
    where: Tensor,
    context: Tensor | None,
    weight: Tensor,
    drop: StackDropout | None = None,
    backend: str = "auto",
) -> Tensor:
    """(*where.shape, W): ``table`` (R, W) rows at integer ``where`` (any shape), plus
    ``context`` (*where.shape, K) (or broadcastable to it; None: no context) times ``weight``
    (W, K) transposed, then ``drop`` (None: no dropout). The context gets no gradient (it is
    made of dates). ``backend``: see ``convrec.ops.dispatch`` (fast path: "cpp")."""
    implementation = resolve("rows_with_context", backend, table.device)
    fits = context is None or context.shape[:-1] == where.shape
    if implementation == "reference" or table.dtype not in EXTENSION_DTYPES["cpu"] or not fits:
        return rows_with_context_reference(table, where, context, weight, drop)
    if context is not None and context.requires_grad:
        raise ValueError("rows_with_context: the context gets no gradient; detach it")
    flat = None if context is None else context.reshape(-1, context.shape[-1]).to(table.dtype)
    seed, p = (None, 0.0) if drop is None else (drop.seed, drop.p)
    out = torch.ops.convrec.rows_with_context(table, where.reshape(-1), flat, weight, seed, p)
    return out.view(*where.shape, table.shape[1])


def _register_extension_op() -> None:
    """Fake and autograd implementations of ``convrec::rows_with_context`` (C++ schema)."""

    @torch.library.register_fake("convrec::rows_with_context")
    def _(table, where, context, weight, dropout_seed, dropout):
        return table.new_empty(where.shape[0], table.shape[1])

    def setup_context(ctx, inputs, output) -> None:
        table, where, context, _, seed, p = inputs
        ctx.table_rows, ctx.p = table.shape[0], p
        ctx.save_for_backward(where, context, seed)

    def backward(ctx, grad):
        where, context, seed = ctx.saved_tensors
        grad = grad.contiguous()
        if seed is not None:  # dropout is linear and self-adjoint
            grad = torch.ops.convrec.stack_dropout(grad, seed, 0, ctx.p)
        table_grad = torch.ops.convrec.embedding_rows_backward(grad, where, ctx.table_rows, -1)
        # without a context the weight was not read: no gradient, as in the reference
        weight_grad = None if context is None else (context.T @ grad).T
        return table_grad, None, None, weight_grad, None, None

    torch.library.register_autograd(
        "convrec::rows_with_context", backward, setup_context=setup_context
    )


if extension_status() is None:
    _register_extension_op()
