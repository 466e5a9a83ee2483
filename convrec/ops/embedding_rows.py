"""``embedding_rows``: the rows of an embedding table a call picks, with a fast dense gradient.

The faithful item encoder looks up the item table once per distinct id of a call, and the
table's gradient is dense: (num_items + 1, D), zero but at those rows. ATen's CPU embedding
backward fills it with vector stores that read every cache line before writing it, and then
adds the rows (at 200k items x 64, about 7 ms of a 35 ms faithful step at L = 50, one
thread). The reference is ``F.embedding``; "cpp" is the op ``convrec::embedding_rows``: the same
gather forward, and a backward in ``convrec._C`` (``csrc/embedding_rows.h``) that zeroes the
table by ``memset`` chunk by chunk and adds each entry's gradient row in entry order (the
result does not depend on the thread count). CUDA tensors take the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from convrec.ops.dispatch import EXTENSION_DTYPES, extension_status, resolve


def embedding_rows_reference(table: Tensor, ids: Tensor, padding_idx: int | None = None) -> Tensor:
    """The oracle: ``F.embedding`` (no gradient reaches row ``padding_idx``)."""
    return F.embedding(ids, table, padding_idx)


def embedding_rows(
    table: Tensor, ids: Tensor, padding_idx: int | None = None, backend: str = "auto"
) -> Tensor:
    """(*ids.shape, D): the rows of ``table`` (N, D) at integer ``ids`` of any shape; the
    gradient of row ``padding_idx`` stays zero, as with ``nn.Embedding(padding_idx=...)``.
    ``backend``: see ``convrec.ops.dispatch`` (fast path: "cpp")."""
    implementation = resolve("embedding_rows", backend, table.device)
    if implementation == "reference" or table.dtype not in EXTENSION_DTYPES["cpu"]:
        return embedding_rows_reference(table, ids, padding_idx)
    if padding_idx is not None and not -table.shape[0] <= padding_idx < table.shape[0]:
        raise ValueError(
            f"padding_idx {padding_idx} is not a row of the {tuple(table.shape)} table"
        )
    padding = -1 if padding_idx is None else padding_idx % table.shape[0]
    rows = torch.ops.convrec.embedding_rows(table, ids.reshape(-1), padding)
    return rows.view(*ids.shape, table.shape[1])


def _register_extension_op() -> None:
    """``convrec::embedding_rows``: ``index_select``'s forward with ``convrec._C``'s backward."""

    @torch.library.custom_op("convrec::embedding_rows", mutates_args=(), device_types="cpu")
    def _(table: Tensor, ids: Tensor, padding_idx: int) -> Tensor:
        return table.index_select(0, ids)

    @torch.library.register_fake("convrec::embedding_rows")
    def _(table, ids, padding_idx):
        return table.new_empty(ids.shape[0], table.shape[1])

    @torch.library.register_fake("convrec::embedding_rows_backward")
    def _(grad, ids, table_rows, padding_idx):
        return grad.new_empty(table_rows, grad.shape[1])

    def setup_context(ctx, inputs, output) -> None:
        table, ids, padding_idx = inputs
        ctx.table_rows, ctx.padding_idx = table.shape[0], padding_idx
        ctx.save_for_backward(ids)

    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        table_grad = torch.ops.convrec.embedding_rows_backward(
            grad.contiguous(), ids, ctx.table_rows, ctx.padding_idx
        )
        return table_grad, None, None

    torch.library.register_autograd(
        "convrec::embedding_rows", backward, setup_context=setup_context
    )


if extension_status() is None:
    _register_extension_op()
