"""User vectors against every item: their scores, and the full-softmax cross-entropy without
the score matrix.

``score_all_items(users, vectors)`` is the (P, N + 1) score matrix, padding column -inf.
``all_items_cross_entropy(users, vectors, targets)`` is the mean over rows of
``-log softmax(users @ vectors.T)[row, target]`` with column 0 (padding) left out: exactly
``all_items_cross_entropy_reference``, ``F.cross_entropy`` of ``score_all_items``. The
reference writes the (P, N + 1) score matrix, its log-softmax and their gradients, the largest
tensors of a full-softmax training step (1,500 targets x 12,102 items = 73 MB each on Beauty;
gigabytes for a GPU batch of all-positions windows), and exponentiates every score twice.

The fused version walks the rows in chunks of about ``CHUNK_ELEMENTS`` scores: per chunk one
GEMM for the scores, one pass that turns them into ``softmax - onehot`` in place (the
gradient of the loss with respect to the scores), and the two GEMMs of the backward, which
add into the gradients of ``users`` and ``vectors``. The gradients are therefore computed in
the forward (as Liger-Kernel's fused linear cross-entropy does) and the backward only scales
them by the incoming gradient: no GEMM is repeated, and no (P, N + 1) tensor exists at any
time. Without autograd (``torch.no_grad`` or inputs that need no gradient) the chunks stop
after the loss.

Half-precision inputs (autocast on a GPU) get their chunk scores, softmax and loss in float32,
as ``F.cross_entropy`` computes under autocast; the gradient GEMMs run in the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Scores per chunk: about 4 MB of float32 on the CPU, where a chunk that stays in the core's
# cache between its GEMM and its softmax pass is what makes the fused loss faster (64-128 rows
# of Beauty's 12,102 items were fastest on this project's CPU; benchmarks/results/loss_cpu);
# 128 MB on a GPU, where fewer, larger chunks mean fewer launches and memory is the point.
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 25}


def score_all_items(users: Tensor, vectors: Tensor) -> Tensor:
    """``users`` (P, D) against every item ``vectors`` (N + 1, D) -> (P, N + 1), column 0
    (padding) -inf. The -inf enters as the GEMM's bias row, so the score matrix is written
    once: no masked copy of it forward, none of its gradient backward."""
    padding = torch.zeros(vectors.shape[0], dtype=users.dtype, device=users.device)
    padding[0] = float("-inf")
    return torch.addmm(padding, users, vectors.T)


def all_items_cross_entropy_reference(users: Tensor, vectors: Tensor, targets: Tensor) -> Tensor:
    """``F.cross_entropy`` of ``users`` (P, D) against every item ``vectors`` (N + 1, D), the
    padding column scoring -inf; ``targets`` (P,) in [1, N]. The oracle of the fused version."""
    return F.cross_entropy(score_all_items(users, vectors), targets)


def chunk_rows(num_columns: int, device: torch.device) -> int:
    """Rows per chunk for ``num_columns`` scores per row on ``device``."""
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"])
    return max(1, budget // max(num_columns, 1))


def all_items_cross_entropy(
    users: Tensor, vectors: Tensor, targets: Tensor, rows_per_chunk: int | None = None
) -> Tensor:
    """Mean cross-entropy of each row's target among items 1..N (column 0, padding, excluded):
    ``users`` (P, D), ``vectors`` (N + 1, D) of the same dtype and device, ``targets`` (P,)
    integer ids in [1, N]. Equal to ``all_items_cross_entropy_reference`` (to rounding; the
    tests compare in float64), in chunks of ``rows_per_chunk`` rows (default ``chunk_rows``)."""
    _check(users, vectors, targets)
    rows = rows_per_chunk or chunk_rows(vectors.shape[0], users.device)
    if rows < 1:
        raise ValueError(f"rows_per_chunk must be at least 1, got {rows}")
    wanted = torch.is_grad_enabled()
    grads = (wanted and users.requires_grad, wanted and vectors.requires_grad)
    return _AllItemsCrossEntropy.apply(users, vectors, targets.long(), rows, grads)


def _check(users: Tensor, vectors: Tensor, targets: Tensor) -> None:
    if users.dim() != 2 or vectors.dim() != 2 or users.shape[1] != vectors.shape[1]:
        raise ValueError(
            f"all_items_cross_entropy: users (P, D) and vectors (N + 1, D) must share D, got "
            f"{tuple(users.shape)} and {tuple(vectors.shape)}"
        )
    if users.dtype != vectors.dtype or users.device != vectors.device:
        raise ValueError(
            f"all_items_cross_entropy: users ({users.dtype}, {users.device}) and vectors "
            f"({vectors.dtype}, {vectors.device}) must share dtype and device"
        )
    if targets.shape != users.shape[:1] or targets.dtype.is_floating_point:
        raise ValueError(
            f"all_items_cross_entropy: targets must be ({users.shape[0]},) integer ids, got "
            f"{targets.dtype} {tuple(targets.shape)}"
        )
    if users.shape[0] == 0:
        raise ValueError("all_items_cross_entropy: no rows (the mean of nothing)")
    if vectors.shape[0] < 2:
        raise ValueError("all_items_cross_entropy: vectors hold no item besides padding")
    low, high = int(targets.min()), int(targets.max())
    if low < 1 or high >= vectors.shape[0]:
        bad = low if low < 1 else high
        raise ValueError(
            f"all_items_cross_entropy: target id {bad} is not an item (ids are 1.."
            f"{vectors.shape[0] - 1}; 0 is padding)"
        )


class _AllItemsCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in one pass over row chunks (see the module docstring)."""

    @staticmethod
    def forward(
        ctx,
        users: Tensor,
        vectors: Tensor,
        targets: Tensor,
        rows: int,
        grads: tuple[bool, bool],
    ) -> Tensor:
        total = users.shape[0]
        acc = users.dtype if users.dtype == torch.float64 else torch.float32
        loss = torch.zeros((), dtype=acc, device=users.device)
        grad_users = torch.empty_like(users) if grads[0] else None
        grad_vectors = torch.zeros_like(vectors) if grads[1] else None
        scores = torch.empty(min(rows, total), vectors.shape[0], dtype=acc, device=users.device)
        for first in range(0, total, rows):
            part = users[first : first + rows]
            count = part.shape[0]
            chunk = scores[:count]
            if users.dtype == acc:
                torch.mm(part, vectors.T, out=chunk)
            else:
                chunk.copy_(part @ vectors.T)
            chunk[:, 0] = float("-inf")
            target = targets[first : first + count, None]
            target_score = chunk.gather(1, target)
            peak = chunk.amax(dim=1, keepdim=True)
            chunk.sub_(peak).exp_()
            norm = chunk.sum(dim=1, keepdim=True)
            loss += (norm.log() + peak - target_score).sum()  # log-sum-exp - target score
            if not any(grads):
                continue
            chunk.div_(norm)  # softmax
            chunk.scatter_add_(1, target, torch.full_like(target_score, -1.0))
            grad = chunk.to(users.dtype)
            if grad_users is not None:
                torch.mm(grad, vectors, out=grad_users[first : first + count])
            if grad_vectors is not None:
                grad_vectors.addmm_(grad.T, part)
        ctx.save_for_backward(grad_users, grad_vectors)
        ctx.total = total
        return loss / total  # float32 for half inputs, as F.cross_entropy under autocast

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor):
        grad_users, grad_vectors = ctx.saved_tensors
        scale = grad_loss / ctx.total
        return (
            None if grad_users is None else grad_users * scale,
            None if grad_vectors is None else grad_vectors * scale,
            None,
            None,
            None,
        )
