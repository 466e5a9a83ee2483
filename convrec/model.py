"""``ConvRec``: item encoder + ``ConvRecEncoder`` + dot-product scoring (DESIGN.md section 1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convrec.encoder import ConvRecEncoder
from convrec.item_encoder import FaithfulItemEncoder, ItemAttributes, ItemEncoder, ItemInputs
from convrec.ops.dispatch import UsesBackend, warn_once
from convrec.readout import AttentionReadout
from convrec.recommender import SequentialRecommender
from convrec.schedule import DEFAULT_LEVELS


class ConvRec(UsesBackend, SequentialRecommender):
    """The ConvRec recommender.

    ``item_attributes``: CSR ``(offsets (N + 2,), ids)`` or a list of attribute-id lists indexed
    by item id (row 0 = padding); ``item_features``: a dense frozen (N + 1, F) matrix (e.g. image
    features); ``use_time``: add time context from timestamps. ``faithful=True`` uses the paper
    code's input block and its padding fixed at construction from ``max_len`` (required then).
    ``input_dropout`` drops entries of the history item vectors in training (candidates are
    never dropped), the regulariser SASRec applies to its inputs. ``last_item_skip`` (not in
    the paper) adds ``g * v_last``, the newest history item's vector scaled by a learned
    per-channel ``g`` (zero at start), to the user vector: the levels' averages dilute the
    newest item as histories grow, while the next item depends on it most.
    ``last_item_transition`` (not in the paper) adds ``W v_last`` with a learned (D, D) ``W``
    (zero at start): the gate can only favour items like the newest one, ``W`` also learns
    which items follow it (shampoo -> conditioner), FPMC's item-to-item transition.
    ``last_item_mlp`` (not in the paper) adds ``MLP(v_last)`` (D -> 4D -> D, GELU, output zero
    at start), a non-linear transition like the feed-forward block SASRec applies to each item.
    ``last_item_table`` (not in the paper) adds ``T[last item id]``, a learned per-item row (zero
    at start): FPMC's factorised transition, free to remember what follows each single item.
    ``attention_readout`` (not in the paper) adds ``convrec.readout.AttentionReadout``: one
    query per user over its history item vectors, so long histories are read by content too.

    ``backend="triton"`` runs the item gather fused into level 1 (``ops.embed_conv_pool``) and
    the other levels and candidate vectors on Triton too. The fused kernel covers item rows and
    attributes only: "triton" refuses dense features, time context and the faithful block;
    "auto" runs the first two unfused with one warning, and never fuses the faithful block.
    The kernel never stores the item vectors, so training with ``input_dropout`` gathers them
    unfused (evaluation stays fused), and the readouts gather what they read again: the newest
    item for the skip, the whole history for the attention readout.
    Every backend reads the same ``state_dict``.
    """

    def __init__(
        self,
        num_items: int,
        d_model: int = 64,
        levels: Sequence[Sequence[int]] = DEFAULT_LEVELS,
        heads: int = 1,
        dropout: float = 0.1,
        *,
        item_attributes: ItemAttributes | None = None,
        num_attributes: int | None = None,
        item_features: Tensor | None = None,
        use_time: bool = False,
        mask_aware: bool = False,
        input_dropout: float = 0.0,
        last_item_skip: bool = False,
        last_item_transition: bool = False,
        last_item_mlp: bool = False,
        last_item_table: bool = False,
        attention_readout: bool = False,
        faithful: bool = False,
        max_len: int | None = None,
        backend: str = "auto",
        check_inputs: bool = False,
    ) -> None:
        super().__init__()
        if faithful and max_len is None:
            raise ValueError("faithful=True fixes the padding at construction: pass max_len")
        if faithful and mask_aware:
            raise ValueError("faithful=True uses the paper's plain pooling: set mask_aware=False")
        if not 0.0 <= input_dropout < 1.0:
            raise ValueError(f"input_dropout must be in [0, 1), got {input_dropout}")
        self.input_dropout = input_dropout
        self.max_len, self.faithful, self.check_inputs = max_len, faithful, check_inputs
        inputs = ItemInputs(num_items, item_attributes, num_attributes, item_features, use_time)
        if faithful:
            self.item_encoder = FaithfulItemEncoder(inputs, d_model, dropout=dropout)
            self._unfusable = "the faithful input block"
        else:
            self.item_encoder = ItemEncoder(inputs, d_model)
            self._unfusable = self.item_encoder.unfusable()
        self.encoder = ConvRecEncoder(
            d_model,
            levels,
            heads=heads,
            dropout=dropout,
            mask_aware=mask_aware,
            fixed_length=max_len if faithful else None,
            check_inputs=check_inputs,
        )
        self.last_item_gate = nn.Parameter(torch.zeros(d_model)) if last_item_skip else None
        self.last_item_transition = None
        if last_item_transition:
            self.last_item_transition = nn.Linear(d_model, d_model, bias=False)
            nn.init.zeros_(self.last_item_transition.weight)
        self.last_item_mlp = None
        if last_item_mlp:
            out = nn.Linear(4 * d_model, d_model)
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
            self.last_item_mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), out)
        self.last_item_table = None
        if last_item_table:
            self.last_item_table = nn.Embedding(num_items + 1, d_model, padding_idx=0)
            nn.init.zeros_(self.last_item_table.weight)
        self.attention_readout = AttentionReadout(d_model) if attention_readout else None
        self.set_backend(backend)

    def check_backend_choice(self, name: str) -> None:
        if name == "triton" and self._unfusable is not None:
            raise ValueError(
                f"backend 'triton' fuses the item gather into level 1 and does not cover "
                f"{self._unfusable}: use backend='auto' or 'reference'"
            )

    def _encode(self, item_ids: Tensor, mask: Tensor, timestamps: Tensor | None) -> Tensor:
        if self.max_len is not None and item_ids.shape[1] > self.max_len:
            raise ValueError(f"history length {item_ids.shape[1]} exceeds max_len={self.max_len}")
        if not self._fused(item_ids.device):
            x = self.item_encoder(item_ids, mask, timestamps)
            x = F.dropout(x, self.input_dropout, self.training)
            return self.user_from_vectors(x, item_ids)
        user = self.encoder.forward_ids(item_ids, self.item_encoder.tables(), mask)
        if not self._has_readouts():
            return user
        # the fused kernel never stores the item vectors: gather what the readouts read again
        if self.attention_readout is None:
            item_ids, mask = item_ids[:, -1:], mask[:, -1:]
        return self._readouts(user, self.item_encoder(item_ids, mask), item_ids)

    def user_from_vectors(self, x: Tensor, item_ids: Tensor) -> Tensor:
        return self._readouts(self.encoder(x, item_ids != 0), x, item_ids)

    def _has_readouts(self) -> bool:
        parts = (
            self.last_item_gate,
            self.last_item_transition,
            self.last_item_mlp,
            self.last_item_table,
            self.attention_readout,
        )
        return any(part is not None for part in parts)

    def _readouts(self, user: Tensor, x: Tensor, item_ids: Tensor) -> Tensor:
        """Add the last-item readouts (skip, transition, MLP, table) and the attention readout,
        those the model has, to ``user``.

        ``x`` (B, L, D) is zero at padding, ``item_ids`` (B, L) its ids; the last-item readouts
        read only the newest slot.
        """
        if self.last_item_gate is not None:
            user = user + self.last_item_gate * x[:, -1]
        if self.last_item_transition is not None:
            user = user + self.last_item_transition(x[:, -1])
        if self.last_item_mlp is not None:
            user = user + self.last_item_mlp(x[:, -1])
        if self.last_item_table is not None:
            user = user + self.last_item_table(item_ids[:, -1])
        if self.attention_readout is not None:
            user = user + self.attention_readout(user, x, item_ids != 0)
        return user

    def _fused(self, device: torch.device) -> bool:
        """Whether level 1 runs as ``embed_conv_pool``: on Triton, for what the kernel covers.

        The faithful block is a comparison mode, never fused, so it warns about nothing.
        """
        if self.faithful or self.encoder.backend_for(device) != "triton":
            return False
        if self.training and self.input_dropout > 0:
            return False  # the dropped vectors must exist: see the class docstring
        if self._unfusable is not None:  # only "auto" gets here (see __init__)
            warn_once(
                f"convrec: ConvRec gathers items unfused: the fused kernel lacks {self._unfusable}"
            )
            return False
        return True
