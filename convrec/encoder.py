"""``ConvRecEncoder``: the drop-in sequence encoder, (B, L, D) + padding mask -> (B, D), or
item ids + embedding tables -> (B, D) with the gather fused into level 1 (``forward_ids``).

The module only owns parameters; the computation is ``convrec.ops.downscale`` (after
``convrec.ops.embed_conv_pool`` on the fused path), so every backend reads the same
``state_dict``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convrec.checks import check_sequence
from convrec.ops.dispatch import UsesBackend, kernel_size_problem, set_backend
from convrec.ops.downscale import (
    PAPER_NORM_EPS,
    PAPER_NORM_TRITON,
    downscale,
    downscale_backend,
    level_mix,
)
from convrec.ops.embed_conv_pool import embed_conv_pool
from convrec.ops.gather_embed import gather_embed
from convrec.ops.item_tables import ItemTables
from convrec.ops.level_params import LevelParams, PackedLevels
from convrec.ops.stack_dropout import StackDropout
from convrec.ops.stream_downscale import (
    StreamState,
    check_stream_levels,
    kept_rows,
    stream_downscale,
    stream_downscale_prefix,
    stream_push,
    stream_state,
)
from convrec.schedule import DEFAULT_LEVELS, check_levels, schedule_for_length

LEVEL_KEYS = (
    "conv.weight",
    "conv.bias",
    "linear.weight",
    "linear.bias",
    "alpha",
    "beta",
    "norm.weight",
    "norm.bias",
)
"""Names of a level's tensors under ``stack.{l}.`` (``LevelParams`` order): the ``state_dict``
keys of encoders before the stack was packed, which ``load_state_dict`` still accepts."""


def level_key_names(prefix: str, levels: int) -> list[str]:
    """``{prefix}stack.{l}.{key}`` for every level l and ``key`` in ``LEVEL_KEYS``, in the
    packed order."""
    return [f"{prefix}stack.{level}.{key}" for level in range(levels) for key in LEVEL_KEYS]


def initial_stack(d_model: int, levels: Sequence[tuple[int, int]], heads: int) -> Tensor:
    """Packed initial parameters (``PackedLevels`` layout): per level the default initialisation
    of a grouped ``nn.Conv1d`` and an ``nn.Linear`` (drawn in that order, level by level),
    alpha = beta = 0.5, LayerNorm weight 1 and bias 0."""
    parts = []
    for kernel, stride in levels:
        conv = nn.Conv1d(d_model, d_model, kernel, stride=stride, groups=heads)
        linear = nn.Linear(d_model, d_model)
        halves, ones, zeros = torch.full((2,), 0.5), torch.ones(d_model), torch.zeros(d_model)
        parts += [conv.weight, conv.bias, linear.weight, linear.bias, halves, ones, zeros]
    return torch.cat([t.detach().reshape(-1) for t in parts])


class ConvRecEncoder(UsesBackend, nn.Module):
    """Hierarchy of strided convolutions that compresses a history into one vector.

    Cost is linear in L. Padding per level is computed from the actual length of each call, so
    any L >= 1 works; ``fixed_length`` instead left-pads every input to that length (the paper
    code's fixed-at-construction padding) and rejects longer ones. ``streaming=True`` anchors
    the windows at the first event instead of the newest (``ops.stream_downscale``; every level
    needs kernel = stride): ``forward_positions`` then gives the user vector after every
    position in one pass and ``push`` updates users one event at a time. ``newest_last``
    (default: on for a streaming stack) gives each level's open window the items that have
    arrived in its last slots, so the newest meets the last kernel offset (its ``push`` state
    also keeps each open window's terms summed by shift: ``ops.stream_downscale``);
    ``newest_last=False`` keeps them in their anchored slots (the in-place layout, a smaller
    state; it trails on LastFM, ``benchmarks/results/streaming_cpu/accuracy.md``).
    ``backend`` names the
    implementation of ``ops.downscale`` (``convrec.ops.dispatch``; change it with
    ``convrec.ops.dispatch.set_backend``). ``paper_norm=True`` normalises every level as the
    paper code does (``ops.downscale.paper_layer_norm``, eps 1e-6); the reference and the
    extension implement it, Triton does not (the encoder refuses "triton").

    Every level's parameters live packed in one parameter, ``stack_weights``
    (``ops.level_params.PackedLevels``), so the extension reads them whole and a backward
    writes one gradient; ``level_params()`` gives per-level views and ``level_state()`` them by
    their ``stack.{l}.*`` names (``LEVEL_KEYS``), which ``load_state_dict`` also accepts.
    """

    def __init__(
        self,
        d_model: int,
        levels: Sequence[Sequence[int]] = DEFAULT_LEVELS,
        heads: int = 1,
        dropout: float = 0.1,
        mask_aware: bool = False,
        backend: str = "auto",
        fixed_length: int | None = None,
        check_inputs: bool = False,
        streaming: bool = False,
        paper_norm: bool = False,
        newest_last: bool | None = None,
    ) -> None:
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        if heads < 1 or d_model % heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by heads={heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if fixed_length is not None and fixed_length < 1:
            raise ValueError(f"fixed_length must be >= 1, got {fixed_length}")
        self.levels = check_levels(levels)
        self.d_model, self.heads, self.dropout = d_model, heads, dropout
        self.mask_aware, self.fixed_length = mask_aware, fixed_length
        self.check_inputs, self.paper_norm = check_inputs, paper_norm
        if newest_last is None:  # a streaming stack's default layout
            newest_last = streaming
        self.streaming, self.newest_last = streaming, newest_last
        if newest_last and not streaming:
            raise ValueError("newest_last lays out a streaming stack's open windows: set streaming")
        if streaming and paper_norm:
            raise ValueError("paper_norm is the paper's stack, anchored at the newest item")
        self.norm_eps = PAPER_NORM_EPS if paper_norm else 1e-5
        self.stack_weights = nn.Parameter(initial_stack(d_model, self.levels, heads))
        if streaming:
            check_stream_levels(self.level_params(), self._strides())
        self.register_load_state_dict_pre_hook(_pack_level_keys)
        set_backend(self, backend)

    def check_backend_choice(self, name: str) -> None:
        problem = kernel_size_problem(max(k for k, _ in self.levels))
        if self.paper_norm:
            problem = PAPER_NORM_TRITON
        if name == "triton" and problem is not None:
            raise ValueError(f"backend 'triton' cannot run levels {self.levels}: {problem}")

    @classmethod
    def for_length(
        cls,
        max_len: int,
        d_model: int,
        max_kernel: int = 8,
        num_levels: int | None = None,
        **kwargs,
    ) -> ConvRecEncoder:
        """An encoder whose strides multiply to >= ``max_len`` (see ``schedule_for_length``)."""
        return cls(d_model, schedule_for_length(max_len, max_kernel, num_levels), **kwargs)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, return_levels: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """``x`` (B, L, D) left-padded (newest last), ``mask`` (B, L) bool -> user vectors (B, D).

        With ``return_levels`` also returns every level's output, (B, L_l, D) each.
        """
        check_sequence(x, self.d_model, mask, self.check_inputs)
        if self.streaming:
            if return_levels:
                raise ValueError("a streaming encoder returns no level outputs")
            if not self.training:  # one vector per history: the stack once, not every prefix
                if mask is None:
                    mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
                args = (self.level_params(), self._strides(), self.heads, self.mask_aware)
                return stream_downscale_prefix(x, mask, *args, self.norm_eps, self.newest_last)
            return self.forward_positions(x, mask)[:, -1]
        if self.fixed_length is not None:
            x, mask = self._pad_to_fixed_length(x, mask)
        out = downscale(
            x,
            self.packed(),
            self._strides(),
            self.heads,
            mask=mask,
            mask_aware=self.mask_aware,
            dropout=self.dropout,
            training=self.training,
            eps=self.norm_eps,
            return_levels=return_levels,
            backend=self.backend_for(x.device),
            paper_norm=self.paper_norm,
        )
        return (out.user, out.levels) if return_levels else out.user

    def forward_positions(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Streaming encoders: (B, L, D) left-padded -> (B, L, D), slot t the user vector of the
        history up to t (zeros at padding); real items contiguous up to the newest slot."""
        if not self.streaming:
            raise TypeError("only a streaming encoder (streaming=True) encodes every position")
        check_sequence(x, self.d_model, mask, self.check_inputs)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        args = (x, mask, self.packed(), self._strides(), self.heads, self.mask_aware)
        options = (self.dropout, self.training, self.norm_eps, self.backend, self.newest_last)
        return stream_downscale(*args, *options)

    def initial_state(self, batch: int, like: Tensor) -> StreamState:
        """The ``push`` state of ``batch`` users without events (``like``'s device and dtype)."""
        kept = kept_rows(self._strides(), self.newest_last)
        return stream_state(batch, self.d_model, len(self.levels), like, kept)

    def push(self, state: StreamState, x: Tensor) -> tuple[Tensor, StreamState]:
        """Streaming encoders, eval mode: one new event's vector per user (B, D) -> their user
        vectors (B, D) and the new state, at O(levels) cost whatever the history length."""
        if not self.streaming:
            raise TypeError("only a streaming encoder (streaming=True) updates a state")
        args = (self.level_params(), self._strides(), self.heads, self.mask_aware)
        return stream_push(state, x, *args, self.norm_eps, self.newest_last)

    def packed(self) -> PackedLevels:
        """The level stack's parameters as ``ops.downscale`` takes them."""
        kernels = tuple(k for k, _ in self.levels)
        return PackedLevels(self.stack_weights, kernels, self.d_model, self.heads)

    def level_params(self) -> list[LevelParams]:
        """Per-level views of ``stack_weights`` (writable; gradients reach the packed tensor)."""
        return self.packed().unpack()

    def level_state(self, prefix: str = "") -> dict[str, Tensor]:
        """The per-level views by name, ``{prefix}stack.{l}.{key}`` for ``key`` in
        ``LEVEL_KEYS``: the tensors a ``state_dict`` held before the stack was packed."""
        tensors = [t for params in self.level_params() for t in params]
        return dict(zip(level_key_names(prefix, len(self.levels)), tensors, strict=True))

    def _strides(self) -> list[int]:
        return [s for _, s in self.levels]

    def forward_ids(
        self,
        item_ids: Tensor,
        tables: ItemTables,
        mask: Tensor | None = None,
        return_levels: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """``forward(gather_embed(item_ids, tables, mask), mask)`` for (B, L) ids.

        ``tables`` as in ``convrec.ops.gather_embed``; ``mask`` defaults to ``item_ids != 0``.
        On the "triton" backend level 1 runs as the fused ``embed_conv_pool`` kernel, so the
        (B, L, D) embeddings are never stored; the other levels follow on the same backend.
        """
        if mask is None:
            mask = item_ids != 0
        backend = self.backend_for(tables.item.device)
        if backend != "triton" or self.streaming:
            x = gather_embed(item_ids, tables, mask, self.backend)
            return self(x, mask, return_levels)
        if self.fixed_length is not None:
            item_ids, mask = self._pad_to_fixed_length(item_ids, mask)
        packed, strides, eps = self.packed(), self._strides(), self.norm_eps
        params = packed.unpack()
        drop = StackDropout.draw(self.dropout, self.training, item_ids.device, backend)
        first = embed_conv_pool(
            item_ids,
            tables,
            params[0].conv_weight,
            params[0].conv_bias,
            strides[0],
            self.heads,
            mask,
            self.mask_aware,
            backend,
        )
        x = level_mix(*first[:3], params[0], first.mask, drop, 0, eps)
        out = downscale(
            x,
            packed.tail(1),
            strides[1:],
            self.heads,
            mask=first.mask,
            mask_aware=self.mask_aware,
            dropout=self.dropout,
            training=self.training,
            eps=eps,
            return_levels=return_levels,
            residual=first.residual,
            backend=backend,
        )
        return (out.user, [x, *out.levels]) if return_levels else out.user

    def backend_for(self, device: torch.device) -> str:
        """The implementation of ``ops.downscale`` this encoder runs on ``device``."""
        kernels = [k for k, _ in self.levels]
        return downscale_backend(self.backend, device, kernels, self.paper_norm)

    def _pad_to_fixed_length(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Left-pad ``x`` (B, L, D), or ids (B, L), and the mask to ``fixed_length``."""
        extra = self.fixed_length - x.shape[1]
        if extra < 0:
            raise ValueError(
                f"sequence length {x.shape[1]} exceeds this encoder's fixed_length "
                f"{self.fixed_length}"
            )
        if extra == 0:
            return x, mask
        if mask is not None:
            mask = F.pad(mask, (extra, 0), value=False)
        return F.pad(x, (0, 0) * (x.dim() - 2) + (extra, 0)), mask

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, levels={self.levels}, heads={self.heads}, "
            f"dropout={self.dropout}, mask_aware={self.mask_aware}, backend={self.backend!r}"
            + (", streaming=True" if self.streaming else "")
            + (", newest_last=True" if self.newest_last else "")
            + (f", fixed_length={self.fixed_length}" if self.fixed_length else "")
            + (", paper_norm=True" if self.paper_norm else "")
        )


def _pack_level_keys(module: nn.Module, state: dict, prefix: str, *_) -> None:
    """``load_state_dict`` pre-hook: per-level ``stack.{l}.*`` tensors (``LEVEL_KEYS``; what
    encoders wrote before the stack was packed, and what ``convrec.compat`` maps to) become one
    ``stack_weights``. Left alone unless every level's every key is there."""
    names = level_key_names(prefix, len(module.levels))
    if f"{prefix}stack_weights" in state or not all(name in state for name in names):
        return
    state[f"{prefix}stack_weights"] = torch.cat([state.pop(name).reshape(-1) for name in names])
