"""``stream_downscale``: the level stack with windows anchored at the user's first event, so the
user vector after every position comes out of one pass, and a new event updates a user in
O(levels) work whatever the history length.

``downscale`` anchors windows at the newest item: a new event shifts every window and nothing
computed before survives. Here position t (0 = the user's first event) belongs to window
``t // s`` of level 1, window w of level l - 1 to window ``w // s`` of level l: padding never
shifts a window, and a prefix sees exactly the windows it would see alone. The newest window of
each level is open: its missing slots read as zeros in the convolution, and the pools divide by
what has arrived (``mask_aware``) or by the stride (the paper's zero padding). Each level is
``downscale``'s level (``level_mix``: Linear, GELU, dropout, alpha / beta pooled residuals,
LayerNorm); the user vector is the mean of the last level's windows so far.

``newest_last=True`` lays each level's open window out differently: the elements that have
arrived sit in its last slots, so the newest always meets the conv's last kernel offset (as in
``downscale``, whose newest window always ends at the newest item) and the missing slots are at
the window's start. A full window is the same either way, so closed windows, and prefixes that
fill every window, do not change. The open window's earlier elements then move by one offset
per arriving element: the reference computes every closed element's term at every offset
and picks, per position, the offsets its window layout gives (the extension computes only the
terms that are read), and
``stream_push`` keeps, instead of one conv sum, the sums of the closed elements' terms at
every shift (k vectors per level).

Kernel = stride only: windows then tile each level, and a closed window never changes. With
kernel > stride neighbouring windows share inputs, so the open input would sit in several
windows of a level at once and each push would re-evaluate them all; such schedules are
refused (``schedule_for_length`` and the default levels have kernel = stride; the
right-anchored ``downscale`` takes any schedule).

Three forms, each the oracle of the next:

- ``stream_downscale_prefix``: the stack run on one history as it is (windows laid out left to
  right, the last one open) -> one user vector per history;
- ``stream_downscale_reference``: every prefix in one pass -> (B, L, D). At time t the open
  element of level l - 1 is one version of a window that later closes; a closed element's
  value is its version at its window's last time step. A level's open window is its closed
  elements' per-offset conv terms and pool sums (an exclusive prefix sum inside each window)
  plus the open element's term, so every level costs O(L) per row. ``stream_downscale``
  dispatches it and its fused twin in ``convrec._C`` ("cpp" / "cuda", ``stream_downscale_ext``);
- ``stream_push``: one event for a batch of users, from a ``StreamState`` of per-level running
  sums: when an element closes its sums move up one level (a carry, as in a counter).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from convrec.ops.dispatch import resolve
from convrec.ops.downscale import level_mix
from convrec.ops.level_params import LevelParams, PackedLevels, pack_levels
from convrec.ops.stack_dropout import StackDropout
from convrec.ops.stream_downscale_ext import stream_downscale_extension


def stream_downscale(
    x: Tensor,
    mask: Tensor,
    params: Sequence[LevelParams] | PackedLevels,
    strides: Sequence[int],
    heads: int,
    mask_aware: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    eps: float = 1e-5,
    backend: str = "reference",
    newest_last: bool = False,
) -> Tensor:
    """(B, L, D): slot t of a left-padded history ``x`` (B, L, D), ``mask`` (B, L), holds the
    user vector of the history up to and including t (``stream_downscale_prefix`` of that
    prefix), zeros at padding; one pass. Real items must be contiguous up to the newest slot.

    ``params``: one ``LevelParams`` per level or the stack packed (``PackedLevels``). The
    implementation follows ``backend`` (``convrec.ops.dispatch``): the reference
    (``stream_positions_reference``) or the ``convrec._C`` op ("cpp" / "cuda",
    ``stream_downscale_ext``). Training-mode dropout draws one seed per call
    (``StackDropout``): every version of an open window gets its own mask, a closed window
    keeps its last version's, and both implementations drop the same elements.
    ``newest_last``: the open window's arrived elements in its last slots (module docstring).
    """
    check_stream_levels(params, strides)
    backend = resolve("stream_downscale", backend, x.device)
    drop = StackDropout.draw(dropout, training, x.device, "reference")
    aligned, lengths = left_align(x * mask[..., None].to(x.dtype), mask)
    if backend in ("cpp", "cuda") and strides:
        packed = params if isinstance(params, PackedLevels) else pack_levels(params, heads)
        positions = stream_downscale_extension(
            aligned, packed, strides, mask_aware, drop, eps, newest_last
        )
    else:
        levels = params.unpack() if isinstance(params, PackedLevels) else params
        positions = stream_positions_reference(
            aligned, levels, strides, heads, mask_aware, drop, eps, newest_last
        )
    return right_align(positions, lengths)


def stream_downscale_reference(
    x: Tensor,
    mask: Tensor,
    params: Sequence[LevelParams] | PackedLevels,
    strides: Sequence[int],
    heads: int,
    mask_aware: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    eps: float = 1e-5,
    newest_last: bool = False,
) -> Tensor:
    """``stream_downscale`` on the PyTorch reference: the oracle of the fast paths."""
    args = (x, mask, params, strides, heads, mask_aware, dropout, training, eps)
    return stream_downscale(*args, backend="reference", newest_last=newest_last)


def check_stream_levels(
    params: Sequence[LevelParams] | PackedLevels, strides: Sequence[int]
) -> None:
    """Raise ``ValueError`` unless every level's kernel equals its stride."""
    if isinstance(params, PackedLevels):
        kernels = list(params.kernels)
    else:
        kernels = [p.conv_weight.shape[-1] for p in params]
    for level, (kernel, stride) in enumerate(zip(kernels, strides, strict=True)):
        if kernel != stride:
            raise ValueError(
                f"streaming needs kernel == stride at every level; level {level} has kernel "
                f"{kernel}, stride {stride}"
            )


def left_align(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Left-padded (B, L, D) histories moved so each starts at index 0 (zeros after the end),
    and their lengths (B,). Real items must be contiguous and end at the last slot."""
    length = mask.shape[1]
    lengths = mask.sum(1)
    index = torch.arange(length, device=x.device) + (length - lengths)[:, None]
    inside = index < length
    gathered = x.gather(1, index.clamp(max=length - 1)[..., None].expand(-1, -1, x.shape[-1]))
    return gathered * inside[..., None].to(x.dtype), lengths


def offset_terms(weight: Tensor, inputs: Tensor, span: int, heads: int) -> Tensor:
    """The conv's term of each input at its window offset: ``inputs`` (B, T, D) whose slot t
    sits at offset ``(t // span) % k`` of its window -> ``W[:, :, offset] @ inputs[:, t]`` per
    group, (B, T, D). Slots sharing an offset are laid side by side, so it is one batched
    product per (group, offset)."""
    batch, length, d = inputs.shape
    kernel, head_dim = weight.shape[-1], d // heads
    block = span * kernel
    padded = F.pad(inputs, (0, 0, 0, -length % block))
    grouped = padded.view(batch, -1, kernel, span, heads, head_dim)
    w = weight.view(heads, head_dim, head_dim, kernel)  # [group, out, in, offset]
    out = torch.einsum("bwosgc,gaco->bwosga", grouped, w)
    return out.reshape(batch, -1, d)[:, :length]


def stream_downscale_prefix(
    x: Tensor,
    mask: Tensor,
    params: Sequence[LevelParams],
    strides: Sequence[int],
    heads: int,
    mask_aware: bool = False,
    eps: float = 1e-5,
    newest_last: bool = False,
) -> Tensor:
    """User vectors (B, D) of left-padded histories ``x`` (B, L, D), ``mask`` (B, L), each as
    the anchored stack sees it alone (eval mode: no dropout). An empty history gives zeros.
    ``newest_last``: each level's open window holds its elements in its last slots."""
    check_stream_levels(params, strides)
    x, lengths = left_align(x * mask[..., None].to(x.dtype), mask)
    residual, arrived = x, lengths  # arrived: real elements of the current level's input
    for p, stride in zip(params, strides, strict=True):
        windows = -(-x.shape[1] // stride)
        pad = windows * stride - x.shape[1]
        x_pad, res_pad = F.pad(x, (0, 0, 0, pad)), F.pad(residual, (0, 0, 0, pad))
        if newest_last:
            x_pad = _open_window_last(x_pad, arrived, stride)
            res_pad = _open_window_last(res_pad, arrived, stride)
        conv = F.conv1d(
            x_pad.transpose(1, 2), p.conv_weight, p.conv_bias, stride=stride, groups=heads
        )
        slot = torch.arange(windows * stride, device=x.device)
        counts = ((slot[None, :] < arrived[:, None]).view(-1, windows, stride)).sum(-1)
        divisor = counts.clamp(min=1) if mask_aware else torch.full_like(counts, stride)
        divisor = divisor[..., None].to(x.dtype)
        pooled = x_pad.view(-1, windows, stride, x.shape[-1]).sum(2) / divisor
        residual = res_pad.view(-1, windows, stride, x.shape[-1]).sum(2) / divisor
        x = level_mix(conv.transpose(1, 2), pooled, residual, p, None, None, 0, eps)
        arrived = -(-arrived // stride)
        exists = (torch.arange(windows, device=x.device)[None, :] < arrived[:, None])[..., None]
        x, residual = x * exists.to(x.dtype), residual * exists.to(x.dtype)
    return x.sum(1) / arrived.clamp(min=1)[:, None].to(x.dtype)


def stream_positions_reference(
    aligned: Tensor,
    params: Sequence[LevelParams],
    strides: Sequence[int],
    heads: int,
    mask_aware: bool,
    dropout: StackDropout | None,
    eps: float,
    newest_last: bool = False,
) -> Tensor:
    """The anchored stack on left-aligned histories (``left_align``) -> (B, L, D), slot t the
    user vector after event t; slots past a history's end hold values nothing before them
    depends on (every step is causal). ``dropout`` gives each level's masks (None = none);
    ``newest_last`` the open windows' layout (module docstring)."""
    version = aligned
    res_version = version  # the long residual enters level 1 as the input itself
    span = 1  # input elements of this level cover ``span`` positions each
    for level, (p, stride) in enumerate(zip(params, strides, strict=True)):
        element, final, final_res = _elements(version, res_version, span)
        closed_pool, closed_res = (
            _exclusive_window_sum(t, stride)[:, element] for t in (final, final_res)
        )
        slot = element % stride  # the open element's offset inside its window
        if newest_last:
            closed_conv = _closed_terms_newest_last(p.conv_weight, final, element, heads)
            open_conv = _term_at(p.conv_weight, version, stride - 1, heads)
        else:
            conv_terms = offset_terms(p.conv_weight, final, 1, heads)
            closed_conv = _exclusive_window_sum(conv_terms, stride)[:, element]
            open_conv = offset_terms(p.conv_weight, version, span, heads)
        conv = p.conv_bias + closed_conv + open_conv
        divisor = (slot + 1 if mask_aware else torch.full_like(slot, stride))[:, None]
        divisor = divisor.to(aligned.dtype)
        res_version = (closed_res + res_version) / divisor
        pooled = (closed_pool + version) / divisor
        version = level_mix(conv, pooled, res_version, p, None, dropout, level, eps)
        span *= stride
    element, final, _ = _elements(version, res_version, span)
    closed = final.cumsum(1) - final  # every closed window of the last level, oldest first
    return (closed[:, element] + version) / (element + 1)[:, None].to(aligned.dtype)


def _elements(version: Tensor, res_version: Tensor, span: int) -> tuple[Tensor, Tensor, Tensor]:
    """The element each time step is in (T,), and every element's final value and residual
    (B, N, D): its version at its last time step (an element still open at the end of the
    sequence gets a placeholder that no closed sum ever reads)."""
    length = version.shape[1]
    time = torch.arange(length, device=version.device)
    count = -(-length // span)
    ends = ((torch.arange(count, device=version.device) + 1) * span - 1).clamp(max=length - 1)
    return time // span, version[:, ends], res_version[:, ends]


def _open_window_last(x: Tensor, arrived: Tensor, stride: int) -> Tensor:
    """Left-aligned elements (B, W * stride, D), ``arrived`` (B,) real, with each row's last,
    partly filled window moved to the end of its slots (zeros before them): the prefix form of
    ``newest_last``."""
    slots = torch.arange(x.shape[1], device=x.device)
    empty = (-arrived) % stride  # (B,): slots the open window still misses
    open_window = (arrived - 1).div(stride, rounding_mode="floor")  # -1: no element yet
    in_open = (slots[None, :] // stride) == open_window[:, None]
    source = slots[None, :] - in_open * empty[:, None]
    real = source >= (slots // stride * stride)[None, :]
    index = source.clamp(min=0)[..., None].expand(-1, -1, x.shape[-1])
    return x.gather(1, index) * real[..., None].to(x.dtype)


def _term_at(weight: Tensor, inputs: Tensor, offset: int, heads: int) -> Tensor:
    """``W[:, :, offset] @ inputs[..., :]`` per group: (..., D) -> (..., D)."""
    d = inputs.shape[-1]
    head_dim = d // heads
    w = weight.view(heads, head_dim, head_dim, weight.shape[-1])[..., offset]
    grouped = inputs.reshape(*inputs.shape[:-1], heads, head_dim)
    return torch.einsum("...gc,gac->...ga", grouped, w).reshape(inputs.shape)


def _closed_terms_newest_last(weight: Tensor, final: Tensor, element: Tensor, heads: int) -> Tensor:
    """Per time step (T,) in element ``element``: the conv terms of the closed elements of its
    open window with the window laid out newest-last, ``sum_i W[:, :, k - 1 - slot + i] @
    final[start + i]`` over i < slot (slot = the open element's place, start = the window's
    first element). Every closed element's term at every offset as rows of B * D values, then
    one ``embedding_bag`` sums the (element, offset) rows each step reads: no (T, k, B, D)
    gather, and a backward that adds whole rows, not k - 1 sorting scatters."""
    batch, count, d = final.shape
    kernel = weight.shape[-1]
    if kernel == 1:  # every window is its open element alone
        return final.new_zeros(batch, element.shape[0], d)
    table = _every_offset_term(weight, final, heads, "nob").reshape(count * kernel, batch * d)
    slot = element % kernel
    place = torch.arange(kernel - 1, device=element.device)
    source = (element - slot)[:, None] + place  # (T, k - 1): the closed elements
    offset = kernel - 1 - slot[:, None] + place
    valid = place[None, :] < slot[:, None]
    row = (source.clamp(max=count - 1) * kernel + offset.clamp(min=0, max=kernel - 1)) * valid
    weights = valid.to(table.dtype)  # the table's: autocast may have narrowed it
    total = F.embedding_bag(row, table, mode="sum", per_sample_weights=weights)  # (T, B * D)
    return total.view(-1, batch, d).transpose(0, 1)


def _exclusive_window_sum(terms: Tensor, stride: int) -> Tensor:
    """``out[:, i] = sum of terms[:, j]`` over the earlier j of i's window of ``stride``."""
    count = terms.shape[1]
    windows = -(-count // stride)
    padded = F.pad(terms, (0, 0, 0, windows * stride - count))
    blocks = padded.view(terms.shape[0], windows, stride, terms.shape[-1])
    return (blocks.cumsum(2) - blocks).view(terms.shape[0], -1, terms.shape[-1])[:, :count]


def right_align(values: Tensor, lengths: Tensor) -> Tensor:
    """The inverse of ``left_align``: left-aligned (B, L, D) back to left-padded slots, zeros
    at padding."""
    length = values.shape[1]
    start = (length - lengths)[:, None]
    index = torch.arange(length, device=values.device) - start
    gathered = values.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, values.shape[-1]))
    return gathered * (index >= 0)[..., None].to(values.dtype)


class StreamState(NamedTuple):
    """What ``stream_push`` keeps per user: ``events`` (B,) so far; per level (lists):
    ``closed`` (B, 3, D), the open window's closed conv terms (zero with ``newest_last``),
    pool sum and residual sum, and ``open_out`` / ``open_res`` (B, D), its current output and
    residual; ``last`` (B, D) the newest input; ``top`` (B, D) the sum of the last level's
    closed windows; ``kept`` per level (B, k, D) with ``newest_last``, row m the sum of
    ``W[:, :, m + i] @ e_i`` over the open window's closed elements e_i (offsets past k - 1
    count zero), and (B, 0, D) otherwise: (5 levels + 2) x D numbers, plus k x D per level with
    ``newest_last``, and a count per user."""

    events: Tensor
    closed: list[Tensor]
    open_out: list[Tensor]
    open_res: list[Tensor]
    last: Tensor
    top: Tensor
    kept: list[Tensor]


def stream_state(
    batch: int, d_model: int, levels: int, like: Tensor, kept: Sequence[int] | None = None
) -> StreamState:
    """The state of ``batch`` users without events (device and dtype of ``like``); ``kept``:
    the rows of ``StreamState.kept`` per level (``kept_rows``; None = none)."""

    def zeros(*shape: int) -> Tensor:
        return like.new_zeros(batch, *shape, d_model)

    kept = kept or [0] * levels
    return StreamState(
        torch.zeros(batch, dtype=torch.int64, device=like.device),
        [zeros(3) for _ in range(levels)],
        [zeros() for _ in range(levels)],
        [zeros() for _ in range(levels)],
        zeros(),
        zeros(),
        [zeros(count) for count in kept],
    )


def kept_rows(strides: Sequence[int], newest_last: bool) -> list[int]:
    """Rows of ``StreamState.kept`` per level: k with ``newest_last``, none otherwise."""
    return [stride if newest_last else 0 for stride in strides]


def stream_push(
    state: StreamState,
    x: Tensor,
    params: Sequence[LevelParams],
    strides: Sequence[int],
    heads: int,
    mask_aware: bool = False,
    eps: float = 1e-5,
    newest_last: bool = False,
) -> tuple[Tensor, StreamState]:
    """One new event per user: its vector ``x`` (B, D) -> (user vectors (B, D), new state).

    Work per event is one level evaluation per level, whatever the history length (eval mode:
    no dropout). When an element of level l - 1 closes (``events`` crosses a multiple of its
    span) its final output and residual join the sums of level l's open window, or start a new
    window there; the last level's closed windows add up in ``top``. ``newest_last``: the
    state (``stream_state`` with ``kept_rows``) keeps the closed elements' terms summed per
    shift m (``StreamState.kept``); the open element at place s reads the sum at shift
    k - 1 - s, and an element closing at place s adds its term at offset m + s to each shift
    m, the same k products per level as the in-place layout.
    """
    check_stream_levels(params, strides)
    t, rows = state.events, torch.arange(x.shape[0], device=x.device)
    previous_out = [state.last, *state.open_out]  # level l's input: level l - 1's output
    previous_res = [state.last, *state.open_res]
    version, res_version = x, x
    closed_sums, outs, ress, kept = [], [], [], []
    span = 1
    for level, (p, stride) in enumerate(zip(params, strides, strict=True)):
        slot = (t // span) % stride  # the open element's offset in level l's open window
        new_element = ((t % span) == 0) & (t > 0)
        keep = (new_element & (slot > 0)).to(x.dtype)[:, None, None]  # the closed one joins
        restart = (new_element & (slot == 0)).to(x.dtype)[:, None, None]  # a new window
        closed_final = previous_out[level]
        if newest_last:  # the closing element's terms join the sums of every shift
            by_offset = _every_offset_term(p.conv_weight, closed_final[:, None], heads)[:, 0]
            offset = torch.arange(stride, device=x.device) + ((slot - 1) % stride)[:, None]
            index = offset.clamp(max=stride - 1)[..., None].expand(-1, -1, x.shape[-1])
            joined = by_offset.gather(1, index) * (offset < stride)[..., None].to(x.dtype)
            shifts = state.kept[level] * (1 - restart) + keep * joined
            kept.append(shifts)
            terms = shifts[rows, stride - 1 - slot]
            additions = torch.stack([torch.zeros_like(x), closed_final, previous_res[level]], 1)
            open_term = _term_at(p.conv_weight, version, stride - 1, heads)
        else:
            kept.append(state.kept[level])
            # the conv terms of the element that closed and of the open one, in one product
            pair = torch.stack([closed_final, version], 1)
            both = _every_offset_term(p.conv_weight, pair, heads)
            term = both[rows, 0, (slot - 1) % stride]
            additions = torch.stack([term, closed_final, previous_res[level]], 1)
            open_term = both[rows, 1, slot]
        closed = (state.closed[level] + keep * additions) * (1 - restart)
        closed_sums.append(closed)
        conv = p.conv_bias + open_term + (terms if newest_last else closed[:, 0])
        divisor = (slot + 1 if mask_aware else torch.full_like(slot, stride))[:, None].to(x.dtype)
        res_version = (closed[:, 2] + res_version) / divisor
        pooled = (closed[:, 1] + version) / divisor
        version = level_mix(conv, pooled, res_version, p, None, None, 0, eps)
        outs.append(version)
        ress.append(res_version)
        span *= stride
    closes = (((t % span) == 0) & (t > 0))[:, None].to(x.dtype)
    top = state.top + closes * state.open_out[-1]
    user = (top + version) / (t // span + 1)[:, None].to(x.dtype)
    return user, StreamState(t + 1, closed_sums, outs, ress, x, top, kept)


def _every_offset_term(weight: Tensor, inputs: Tensor, heads: int, order: str = "bno") -> Tensor:
    """``W[:, :, o] @ inputs[b, n]`` per group for every offset o, (B, N, D) -> the axes batch,
    element and offset in ``order`` (letters b, n, o), then D: (B, N, k, D) by default."""
    batch, count, d = inputs.shape
    kernel, head_dim = weight.shape[-1], d // heads
    w = weight.view(heads, head_dim, head_dim, kernel)  # [group, out, in, offset]
    grouped = inputs.view(batch, count, heads, head_dim)
    out = torch.einsum(f"bngc,gaco->{order}ga", grouped, w)
    return out.reshape(*out.shape[:3], d)


def pack_state(state: StreamState) -> tuple[Tensor, Tensor]:
    """(events (B,), one (B, S) tensor, S = (5 levels + 2 + kept elements) x D): a state as two
    tensors, for pools of users and exported graphs. ``unpack_state`` inverts it."""
    parts = [c.flatten(1) for c in state.closed] + [*state.open_out, *state.open_res]
    kept = [k.flatten(1) for k in state.kept]
    return state.events, torch.cat([*parts, state.last, state.top, *kept], dim=1)


def unpack_state(
    events: Tensor, packed: Tensor, levels: int, kept: Sequence[int] | None = None
) -> StreamState:
    """The ``StreamState`` of ``pack_state``'s two tensors, for a stack of ``levels`` levels
    with ``kept`` rows of ``StreamState.kept`` per level (``kept_rows``; None = none)."""
    kept = list(kept or [0] * levels)
    d = packed.shape[1] // (5 * levels + 2 + sum(kept))
    sizes = [3 * d] * levels + [d] * (2 * levels + 2) + [count * d for count in kept]
    pieces = packed.split(sizes, dim=1)
    closed = [piece.view(-1, 3, d) for piece in pieces[:levels]]
    open_out, open_res = list(pieces[levels : 2 * levels]), list(pieces[2 * levels : 3 * levels])
    last, top = pieces[3 * levels], pieces[3 * levels + 1]
    rows = packed.shape[0]
    elements = [
        piece.view(rows, count, d)
        for piece, count in zip(pieces[3 * levels + 2 :], kept, strict=True)
    ]
    return StreamState(events, closed, open_out, open_res, last, top, elements)
