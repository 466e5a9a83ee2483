"""Input validation that names the problem (shape, dtype, offending id) before any kernel runs.

Range checks cost one host sync; they are skipped while ``torch.compile`` traces, so compiled
graphs stay free of data-dependent branches.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def check_item_ids(item_ids: Tensor, num_items: int, name: str = "item_ids") -> None:
    """Integer ids of rank 2 (B, L), non-empty, each in ``[0, num_items]`` (0 = padding)."""
    if not isinstance(item_ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(item_ids).__name__}")
    if item_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32, got {item_ids.dtype}")
    if item_ids.dim() != 2:
        raise ValueError(f"{name} must have shape (B, L), got {tuple(item_ids.shape)}")
    if item_ids.shape[0] == 0 or item_ids.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(item_ids.shape)}")
    check_id_range(item_ids, num_items, name)


def check_id_range(ids: Tensor, num_items: int, name: str) -> None:
    """Raise naming the first id outside ``[0, num_items]`` and where it sits."""
    if _tracing() or ids.numel() == 0:
        return
    low, high = torch.aminmax(ids)
    if int(low) >= 0 and int(high) <= num_items:
        return
    bad = ((ids < 0) | (ids > num_items)).nonzero()[0]
    value = int(ids[tuple(bad)])
    raise ValueError(
        f"{name} holds id {value} at index {tuple(bad.tolist())}, outside [0, {num_items}] "
        f"(0 is padding, items are 1..{num_items})"
    )


def check_sequence(x: Tensor, d_model: int, mask: Tensor | None, check_finite: bool) -> None:
    """A float (B, L, D) batch with D = ``d_model`` and an optional (B, L) bool mask."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, L, D), got {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x is empty: shape {tuple(x.shape)}")
    if x.shape[2] != d_model:
        raise ValueError(f"x has {x.shape[2]} features, the encoder expects d_model={d_model}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = real item), got {mask.dtype}")
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}, expected (B, L) = {tuple(x.shape[:2])}"
            )
    if check_finite:
        check_finite_values(x, "x")


def check_finite_values(t: Tensor, name: str) -> None:
    """Raise on NaN or infinity, naming the first bad index (only when a model asks for it)."""
    if _tracing():
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        where = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"{name} holds a non-finite value {t[where].item()} at index {where}")
