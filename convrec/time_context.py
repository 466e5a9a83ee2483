"""Time context features computed from interaction timestamps (optional model input).

Several real datasets have no timestamps, so every model works without them; when given, they
become a small per-position feature vector that the item encoder projects and adds.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CONTEXT_DIM = 6
_DAY = 86400.0
_YEAR_DAYS = 365.2425


def time_context(timestamps: Tensor, mask: Tensor) -> Tensor:
    """(B, L) unix seconds of a left-padded history -> (B, L, 6) float32 features.

    Per position: log1p(days since the previous item), log1p(days before the newest item),
    day of week and day of year as sin/cos pairs. Zero gaps are common (Amazon timestamps are
    whole days) and map to 0. Padded positions get all-zero features.
    """
    if timestamps.shape != mask.shape:
        raise ValueError(
            f"timestamps have shape {tuple(timestamps.shape)}, expected {tuple(mask.shape)}"
        )
    days = timestamps.to(torch.float64) / _DAY
    previous = torch.cat([days[:, :1], days[:, :-1]], dim=1)
    has_previous = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1) & mask
    gap = torch.where(has_previous, (days - previous).clamp(min=0), torch.zeros_like(days))
    age = (days[:, -1:] - days).clamp(min=0)
    week = 2 * math.pi * torch.remainder(torch.floor(days), 7) / 7
    year = 2 * math.pi * torch.remainder(days, _YEAR_DAYS) / _YEAR_DAYS
    features = torch.stack(
        [gap.log1p(), age.log1p(), week.sin(), week.cos(), year.sin(), year.cos()], dim=-1
    )
    return (features * mask.unsqueeze(-1)).to(torch.float32)
