"""Item encoders: item ids (+ attributes, dense features, time context) -> vectors.

``ItemEncoder`` is the gather of docs/design.md (item row + mean attribute row, no
per-position MLP), the path the fused kernels accelerate. ``FaithfulItemEncoder`` reproduces
the input block of the paper's code (``convrec.compat`` loads the paper's weights into it).
``ItemInputs`` is the spec they take.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convrec.ops.bags_of_rows import bags_of_rows
from convrec.ops.dispatch import UsesBackend
from convrec.ops.downscale import PAPER_NORM_EPS
from convrec.ops.embedding_rows import embedding_rows
from convrec.ops.gather_embed import attribute_bags, gather_embed, rows_at
from convrec.ops.gelu_paper_norm import gelu_paper_norm
from convrec.ops.item_tables import ItemTables, check_csr, csr_from_lists
from convrec.ops.rows_with_context import rows_with_context
from convrec.ops.stack_dropout import StackDropout
from convrec.time_context import (
    CONTEXT_DIM,
    DATE_DIFF_DIM,
    DATE_DIM,
    paper_date_features,
    time_context,
)

EMBEDDING_STD = 0.02

ItemAttributes = tuple[Tensor, Tensor] | Sequence[Sequence[int]]


@dataclass(frozen=True)
class ItemInputs:
    """What a model knows of its items besides their ids: the spec every item encoder takes.

    ``attributes``: CSR ``(offsets (N + 2,), ids)`` or a list of attribute-id lists indexed by
    item id (row 0 = padding); ``num_attributes`` defaults to the largest id + 1;
    ``features``: a dense frozen (N + 1, F) matrix (e.g. image features); ``use_time``: history
    positions get time context from timestamps. The model constructors take these as the
    keywords ``item_attributes``, ``num_attributes``, ``item_features`` and ``use_time``.
    """

    num_items: int
    attributes: ItemAttributes | None = None
    num_attributes: int | None = None
    features: Tensor | None = None
    use_time: bool = False


class _ItemInputs(nn.Module):
    """Attribute CSR and dense features held as buffers, so checkpoints carry them."""

    def __init__(self, inputs: ItemInputs) -> None:
        super().__init__()
        num_items, item_attributes = inputs.num_items, inputs.attributes
        num_attributes, item_features = inputs.num_attributes, inputs.features
        self.use_time = inputs.use_time
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items = num_items
        self.num_attributes = 0
        if item_attributes is not None:
            if isinstance(item_attributes, tuple) and isinstance(item_attributes[0], Tensor):
                offsets, ids = item_attributes
            else:
                offsets, ids = csr_from_lists(item_attributes)
            ids = ids.to(torch.int64)
            if num_attributes is None:
                num_attributes = int(ids.max()) + 1 if ids.numel() else 1
            check_csr(offsets, ids, num_items + 1, num_attributes)
            self.num_attributes = num_attributes
            self.register_buffer("attr_offsets", offsets.clone())
            self.register_buffer("attr_ids", ids.clone())
        if item_features is not None:
            if item_features.dim() != 2 or item_features.shape[0] != num_items + 1:
                raise ValueError(
                    f"item_features must have shape (num_items + 1, F) = ({num_items + 1}, F), "
                    f"got {tuple(item_features.shape)}"
                )
            self.register_buffer("item_features", item_features.detach().to(torch.float32).clone())
        self.has_attributes = item_attributes is not None
        self.has_features = item_features is not None

    def vectors(self, item_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def all_items(self) -> Tensor:
        """(N + 1, D) vectors of every item id; row 0 (padding) is never a valid candidate."""
        device = self.item_embedding.weight.device
        return self.vectors(torch.arange(self.num_items + 1, device=device))


class ItemEncoder(UsesBackend, _ItemInputs):
    """``v -> E_item[v] + mean_a E_attr[a] (+ W_f f_v)``, plus ``W_c c_t`` for history positions.

    ``backend`` names the implementation of ``ops.gather_embed`` (``convrec.ops.dispatch``); it
    is not part of the ``state_dict``.
    """

    def __init__(self, inputs: ItemInputs, d_model: int, backend: str = "auto") -> None:
        super().__init__(inputs)
        self.d_model, self.backend = d_model, backend
        self.item_embedding = nn.Embedding(inputs.num_items + 1, d_model, padding_idx=0)
        nn.init.normal_(self.item_embedding.weight, std=EMBEDDING_STD)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        if self.has_attributes:
            self.attr_embedding = nn.Embedding(self.num_attributes, d_model)
            nn.init.normal_(self.attr_embedding.weight, std=EMBEDDING_STD)
        if self.has_features:
            self.feature_proj = nn.Linear(self.item_features.shape[1], d_model, bias=False)
        if self.use_time:
            self.context_proj = nn.Linear(CONTEXT_DIM, d_model)

    def tables(self) -> ItemTables:
        """What ``ops.gather_embed`` reads: the item table, attribute CSR and attribute table."""
        if not self.has_attributes:
            return ItemTables(self.item_embedding.weight)
        return ItemTables(
            self.item_embedding.weight, self.attr_offsets, self.attr_ids, self.attr_embedding.weight
        )

    def unfusable(self) -> str | None:
        """What the fused gather kernels leave out of this encoder's history vectors, or None."""
        parts = ["dense item features"] if self.has_features else []
        parts += ["time context"] if self.use_time else []
        return " and ".join(parts) or None

    def forward(self, item_ids: Tensor, mask: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """History positions (B, L) -> (B, L, D), zero where ``mask`` is False."""
        x = gather_embed(item_ids, self.tables(), mask, self.backend)
        keep = mask.unsqueeze(-1).to(x.dtype)
        if self.has_features:
            x = x + self.feature_proj(self.item_features[item_ids]) * keep
        if self.use_time:
            x = x + self.context_proj(time_context(timestamps, mask)) * keep
        return x

    def vectors(self, item_ids: Tensor) -> Tensor:
        """Candidate vectors (no time context) for ids of any shape -> (*, D)."""
        flat = item_ids.reshape(1, -1)
        x = gather_embed(flat, self.tables(), flat >= 0, self.backend)
        if self.has_features:
            x = x + self.feature_proj(self.item_features[flat])
        return x.reshape(*item_ids.shape, self.d_model)


class FaithfulItemEncoder(UsesBackend, _ItemInputs):
    """The paper code's input block (``ConvRec(faithful=True)``): same weights, same vectors.

    Item vector of id v with date context c (6 features, ``paper_date_features``): ``item =
    item_proj([E_item[v]; Dropout(fusion([W_a f_v + b_a; context_encoder(c)]))])``, f_v the
    multi-hot attribute vector (a repeated id counts twice, the paper's 0/1 vector once), plus
    ``feature_proj`` of dense features. Input block: ``GELU(in_proj(paper_norm(Dropout(GELU([item;
    dt])))))``, dropout on history positions only, times the mask. ``dt`` are the 3 time-difference
    channels: the year/month/day features minus those of the previous history position (zero context
    at padding), and ones at position 0 of a full ``max_len`` history, as the paper code computes
    them on its ``max_len``-padded input. Without ``use_time`` every context is zero, which is the
    paper model fed no dates (the channels and the context bias still count).

    Candidates get, by default, no date: zero context and zero ``dt``, so their vectors do not
    depend on the user (one table serves full ranking). ``leak_target_date=True`` is the paper
    code's protocol instead: every candidate gets the date of the target interaction and ``dt``
    = its year/month/day features minus the newest history position's. That date is the
    answer's timestamp, unknown when recommending: a leak, for reproducing the paper's numbers.

    Per-id work runs once per distinct id of a call (histories and candidates together in
    ``history_and_candidates``; ``bags_of_rows``), never over the whole catalogue. Parameters
    start as the paper code's (``nn.Linear``/``nn.Embedding`` defaults).
    """

    def __init__(
        self,
        inputs: ItemInputs,
        d_model: int,
        max_len: int,
        dropout: float = 0.1,
        leak_target_date: bool = False,
    ) -> None:
        super().__init__(inputs)
        if leak_target_date and not inputs.use_time:
            raise ValueError("leak_target_date gives candidates the target's date: set use_time")
        self.d_model, self.max_len, self.leak_target_date = d_model, max_len, leak_target_date
        wide = 4 * d_model
        self.item_embedding = nn.Embedding(inputs.num_items + 1, d_model, padding_idx=0)
        if self.has_attributes:  # Linear(multi-hot -> 4D): weight columns as embedding rows
            self.attr_proj = nn.Embedding(self.num_attributes, wide)
            bound = 1 / math.sqrt(self.num_attributes)
            nn.init.uniform_(self.attr_proj.weight, -bound, bound)
        if self.has_features:
            self.feature_proj = nn.Linear(self.item_features.shape[1], wide, bias=False)
        fan_in = self.num_attributes + (self.item_features.shape[1] if self.has_features else 0)
        bound = 1 / math.sqrt(max(fan_in, 1))
        self.feature_bias = nn.Parameter(torch.empty(wide).uniform_(-bound, bound))
        self.context_encoder = nn.Linear(DATE_DIM, d_model)
        self.fusion = nn.Linear(wide + d_model, wide)
        self.item_proj = nn.Linear(d_model + wide, d_model)
        self.norm = nn.LayerNorm(d_model + DATE_DIFF_DIM, eps=PAPER_NORM_EPS)
        self.in_proj = nn.Linear(d_model + DATE_DIFF_DIM, d_model)
        self.dropout = dropout
        self.backend = "auto"

    def _draw_dropout(self, active: bool = True) -> StackDropout | None:
        """A fresh ``StackDropout`` for one of the block's dropouts (the paper's per-position
        masks, one extension pass each way); None outside training, at p = 0 or not ``active``."""
        device = self.item_embedding.weight.device
        return StackDropout.draw(self.dropout, self.training and active, device, self.backend)

    def _fused_rows(self, rows: Tensor, out: Tensor) -> tuple[Tensor | None, Tensor]:
        """(``out @ W_a f_v`` for distinct ids ``rows`` (R,), None without attributes and
        features; the constant ``out @ b_a``). The attribute projection is linear, so ``out``
        (a slice of the fusion, or the fusion then ``item_proj``) is folded into the (A, 4D)
        attribute table first, and the bags sum rows of the folded table."""
        h = None
        if self.has_attributes:
            table = F.linear(self.attr_proj.weight, out)
            h = bags_of_rows(rows, self.attr_offsets, self.attr_ids, table, self.backend)
        if self.has_features:
            features = self.item_features[rows].to(out.dtype)
            projected = F.linear(features, out @ self.feature_proj.weight)
            h = projected if h is None else h + projected
        return h, F.linear(self.feature_bias, out)

    def _row_terms(self, rows: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """Per distinct id ``rows`` (R,): what ``_at_positions`` gathers.

        fusion([h; context_encoder(c)]) = w_attr h + (w_ctx W_c) c + (w_ctx b_c + b_fusion),
        so the id part is computed per row and the context part per position. With dropout
        active the fused 4D vector is needed per position (its mask is): its constant part
        is the context weight's last column, read against a context channel of ones, so no
        pass adds it to the rows. Otherwise item_proj is folded in too, only D-wide rows are
        gathered and the constants join item_proj's bias. Returns (rows (R, D), fused rows
        (R, 4D) or None, the context weight: (4D, 7) with the constant column ((4D, 1) without
        use_time), or (D, 6))."""
        wide = 4 * self.d_model
        w_attr, w_ctx = self.fusion.weight[:, :wide], self.fusion.weight[:, wide:]
        w_item = self.item_proj.weight[:, : self.d_model]
        w_ac = self.item_proj.weight[:, self.d_model :]
        ac_const = F.linear(self.context_encoder.bias, w_ctx, self.fusion.bias)
        ac_ctx = w_ctx @ self.context_encoder.weight  # (4D, 6)
        table = self.item_embedding
        embedded = embedding_rows(table.weight, rows, table.padding_idx, self.backend)
        if self.training and self.dropout > 0:
            fused, bias = self._fused_rows(rows, w_attr)
            if fused is None:
                fused = bias.new_zeros(rows.shape[0], wide)
            item_rows = F.linear(embedded, w_item, self.item_proj.bias)
            const = (bias + ac_const)[:, None]  # without use_time no date weight is read
            weight = torch.cat([ac_ctx, const], dim=1) if self.use_time else const
            return item_rows, fused, weight
        fused, bias = self._fused_rows(rows, w_ac @ w_attr)
        item_rows = F.linear(embedded, w_item, self.item_proj.bias + bias + w_ac @ ac_const)
        return item_rows if fused is None else item_rows + fused, None, w_ac @ ac_ctx

    def _at_positions(
        self, terms: tuple[Tensor, Tensor | None, Tensor], where: Tensor, context: Tensor | None
    ) -> Tensor:
        """Item vectors (*, D) of the rows ``where`` (*) picks from ``_row_terms``, with date
        contexts (*, 6) or broadcastable to it (None: zero context)."""
        rows_out, fused, context_weight = terms
        if fused is None:
            return rows_with_context(rows_out, where, context, context_weight, None, self.backend)
        ones = torch.ones(*where.shape, 1, device=fused.device, dtype=fused.dtype)
        if context is None:  # the constant column alone
            context, context_weight = ones, context_weight[:, -1:]
        else:
            context = torch.cat([context.to(fused.dtype).expand(*where.shape, -1), ones], dim=-1)
        drop = self._draw_dropout()
        ac = rows_with_context(fused, where, context, context_weight, drop, self.backend)
        return rows_at(rows_out, where) + F.linear(ac, self.item_proj.weight[:, self.d_model :])

    def _item_vectors(self, item_ids: Tensor, context: Tensor | None) -> Tensor:
        rows, where = torch.unique(item_ids, return_inverse=True)
        return self._at_positions(self._row_terms(rows), where, context)

    def _input_block(self, v: Tensor, dt: Tensor, history: bool) -> Tensor:
        v = torch.cat([v, dt.to(v.dtype)], dim=-1)
        drop = self._draw_dropout(active=history)
        v = gelu_paper_norm(v, self.norm.weight, self.norm.bias, self.norm.eps, drop, self.backend)
        return F.gelu(self.in_proj(v))

    def history_context(self, timestamps: Tensor | None, mask: Tensor) -> Tensor:
        """(B, L, 6) date contexts of history positions, zero at padding and without use_time."""
        if not self.use_time:
            return torch.zeros(*mask.shape, DATE_DIM, device=mask.device, dtype=torch.float64)
        return paper_date_features(timestamps) * mask.unsqueeze(-1)

    def time_differences(self, context: Tensor) -> Tensor:
        """(B, L, 3): year/month/day features minus the previous position's (zero context before
        the first), ones at position 0 of a full ``max_len`` history."""
        dates = context[..., :DATE_DIFF_DIM]
        dt = dates - F.pad(dates, (0, 0, 1, 0))[:, :-1]
        if dates.shape[1] == self.max_len:
            dt = torch.cat([torch.ones_like(dt[:, :1]), dt[:, 1:]], dim=1)
        return dt

    def forward(self, item_ids: Tensor, mask: Tensor, timestamps: Tensor | None = None) -> Tensor:
        """History positions (B, L) -> (B, L, D), zero where ``mask`` is False."""
        rows, where = torch.unique(item_ids, return_inverse=True)
        context = self.history_context(timestamps, mask)
        v = self._at_positions(self._row_terms(rows), where, context if self.use_time else None)
        return self._history_block(v, context, mask)

    def _history_block(self, v: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        """The input block of history item vectors (B, L, D) with their contexts (B, L, 6)."""
        v = self._input_block(v, self.time_differences(context), history=True)
        return v * mask.unsqueeze(-1).to(v.dtype)

    def vectors(self, item_ids: Tensor) -> Tensor:
        """Candidate vectors with no date (the leak-free protocol) for ids of any shape."""
        rows, where = torch.unique(item_ids, return_inverse=True)
        v = self._item_vectors(rows, None)
        dt = torch.zeros(rows.shape[0], DATE_DIFF_DIM, device=v.device, dtype=v.dtype)
        return rows_at(self._input_block(v, dt, history=False), where)

    def history_and_candidates(
        self,
        item_ids: Tensor,
        mask: Tensor,
        timestamps: Tensor | None,
        candidates: Tensor,
        target_timestamps: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``forward`` of the histories (B, L) and the candidates' vectors (B, C) in one pass
        over their distinct ids and one gather of their rows (one gradient of each per-id
        table instead of two). Candidates get no date, or with ``target_timestamps`` (B,) the
        target's date (the paper code's leaking protocol) and its year/month/day differences
        to the newest history position."""
        if target_timestamps is not None and target_timestamps.shape != candidates.shape[:1]:
            raise ValueError(
                f"target_timestamps must have shape ({candidates.shape[0]},), got "
                f"{tuple(target_timestamps.shape)}"
            )
        rows, where = torch.unique(
            torch.cat([item_ids.flatten(), candidates.flatten()]), return_inverse=True
        )
        if target_timestamps is not None and timestamps is not None and self.use_time:
            # one calendar pass for the history's dates and the target's (B, 1, 6), shared by C
            dates = paper_date_features(torch.cat([timestamps, target_timestamps[:, None]], 1))
            context, target = dates[:, :-1] * mask.unsqueeze(-1), dates[:, -1:]
        else:
            context = self.history_context(timestamps, mask)
            target = None
            if target_timestamps is not None:
                target = paper_date_features(target_timestamps)[:, None, :]
        every_context = None
        if self.use_time:  # the candidates' contexts after the history's, as in ``where``
            shape = (*candidates.shape, DATE_DIM)
            at_candidates = context.new_zeros(shape) if target is None else target.expand(shape)
            every_context = torch.cat([context.flatten(0, -2), at_candidates.flatten(0, -2)])
        v = self._at_positions(self._row_terms(rows), where, every_context)
        # split, not two slices: its backward is one cat where each slice's zero-fills a copy
        at_history, v = v.split([item_ids.numel(), candidates.numel()])
        history = self._history_block(at_history.view(*item_ids.shape, -1), context, mask)
        v = v.view(*candidates.shape, -1)
        if target is None:
            return history, self._input_block(v, torch.zeros_like(v[..., :DATE_DIFF_DIM]), False)
        newest = context[:, -1:, :DATE_DIFF_DIM]  # zero without use_time or at padding
        dt = (target[..., :DATE_DIFF_DIM] - newest).expand(*candidates.shape, -1)
        return history, self._input_block(v, dt, history=False)


class LegacyFaithfulItemEncoder(_ItemInputs):
    """The first approximation of the paper code's input block (``ConvRec(faithful=True,
    faithful_version=1)``), kept so checkpoints written with it still load; it is not the
    paper's model (``FaithfulItemEncoder`` is).

    item = Linear([E_item[v]; Dropout(Linear([Linear_4D(f_v); Linear(c)]))]), then
    Linear(LayerNorm(Dropout(GELU([item; c])))) and GELU, times the mask. f_v is the multi-hot
    attribute vector (and/or dense features). Unlike the paper code, candidates get zero time
    context instead of the date of the true next interaction, which would leak the target.
    """

    def __init__(self, inputs: ItemInputs, d_model: int, dropout: float = 0.1) -> None:
        super().__init__(inputs)
        self.d_model, use_time = d_model, inputs.use_time
        wide, ctx = 4 * d_model, CONTEXT_DIM if use_time else 0
        self.item_embedding = nn.Embedding(inputs.num_items + 1, d_model, padding_idx=0)
        # Linear(multi-hot -> 4D): its weight columns as embedding rows, summed per item
        if self.has_attributes:
            self.attr_proj = nn.Embedding(self.num_attributes, wide)
            nn.init.normal_(self.attr_proj.weight, std=EMBEDDING_STD)
        if self.has_features:
            self.feature_proj = nn.Linear(self.item_features.shape[1], wide, bias=False)
        self.feature_bias = nn.Parameter(torch.zeros(wide))
        if use_time:
            self.context_encoder = nn.Linear(CONTEXT_DIM, d_model)
        self.fusion = nn.Linear(wide + (d_model if use_time else 0), wide)
        self.item_proj = nn.Linear(d_model + wide, d_model)
        self.norm = nn.LayerNorm(d_model + ctx)
        self.in_proj = nn.Linear(d_model + ctx, d_model)
        self.dropout = nn.Dropout(dropout)

    def _item_vectors(self, item_ids: Tensor, context: Tensor | None) -> Tensor:
        h = self.feature_bias.expand(*item_ids.shape, -1)
        if self.has_attributes:
            h = h + attribute_bags(
                item_ids, self.attr_offsets, self.attr_ids, self.attr_proj.weight, mode="sum"
            )
        if self.has_features:
            h = h + self.feature_proj(self.item_features[item_ids])
        if context is not None:
            h = torch.cat([h, self.context_encoder(context)], dim=-1)
        ac = self.dropout(self.fusion(h))
        return self.item_proj(torch.cat([self.item_embedding(item_ids), ac], dim=-1))

    def _input_block(self, v: Tensor, context: Tensor | None, history: bool) -> Tensor:
        if context is not None:
            v = torch.cat([v, context], dim=-1)
        v = F.gelu(v)
        if history:
            v = self.dropout(v)
        return F.gelu(self.in_proj(self.norm(v)))

    def _zero_context(self, item_ids: Tensor) -> Tensor | None:
        if not self.use_time:
            return None
        return torch.zeros(*item_ids.shape, CONTEXT_DIM, device=item_ids.device)

    def forward(self, item_ids: Tensor, mask: Tensor, timestamps: Tensor | None = None) -> Tensor:
        context = time_context(timestamps, mask) if self.use_time else None
        v = self._input_block(self._item_vectors(item_ids, context), context, history=True)
        return v * mask.unsqueeze(-1).to(v.dtype)

    def vectors(self, item_ids: Tensor) -> Tensor:
        context = self._zero_context(item_ids)
        return self._input_block(self._item_vectors(item_ids, context), context, history=False)
