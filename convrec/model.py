"""``ConvRec``: item encoder + ``ConvRecEncoder`` + readouts + dot-product scoring
(docs/design.md section 1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from convrec.encoder import ConvRecEncoder
from convrec.item_encoder import (
    FaithfulItemEncoder,
    ItemAttributes,
    ItemEncoder,
    ItemInputs,
    LegacyFaithfulItemEncoder,
)
from convrec.ops.dispatch import UsesBackend, warn_once
from convrec.ops.stack_dropout import hashed_dropout
from convrec.ops.stream_downscale import StreamState
from convrec.readouts import NEWEST, READOUTS, readout_names, upgrade_state_dict
from convrec.recommender import SequentialRecommender
from convrec.schedule import DEFAULT_LEVELS


class ConvRec(UsesBackend, SequentialRecommender):
    """The ConvRec recommender.

    Item inputs (``item_attributes``, ``num_attributes``, ``item_features``, ``use_time``) as in
    ``convrec.item_encoder.ItemInputs``. ``faithful=True`` is the paper code's model
    (``FaithfulItemEncoder``, its LayerNorm at every level, its padding fixed at construction from
    ``max_len``, required then; ``convrec.compat.from_official`` loads its weights); it runs on the
    reference backend. ``leak_target_date=True`` (faithful, with ``use_time``) adds the paper code's
    candidate protocol: candidates get the target interaction's date, a leak. ``faithful_version=1``
    rebuilds the earlier approximation that old checkpoints hold. ``input_dropout`` drops entries of
    the history item vectors in training (candidates are never dropped), the regulariser SASRec
    applies to its inputs. ``readouts`` names terms added to the user vector after the levels
    (``convrec.readouts.READOUTS``; not in the paper), e.g. ``("last_item_skip",
    "last_item_transition")``. ``streaming=True`` anchors the levels' windows at the first event
    (``ConvRecEncoder(streaming=True)``), so one forward scores the next item at every position
    (``score_positions``, training with ``all-positions``) and the encoder's ``push`` updates a
    user per event; readouts must read only the newest item. ``newest_last`` lays out the open
    windows (``ConvRecEncoder``; default on for streaming models).

    ``backend`` (``convrec.ops.dispatch``; ``set_backend`` changes it) "triton" runs the item gather
    fused into level 1 (``ops.embed_conv_pool``) and the other levels and candidate vectors on
    Triton too. The fused kernel covers item rows and attributes only: "triton" refuses dense
    features, time context and the faithful block; "auto" runs the first two unfused with one
    warning, and never fuses the faithful block. The kernel never stores the item vectors, so
    training with ``input_dropout`` gathers them unfused (evaluation stays fused), and the readouts
    gather what they read again: the newest item, or the whole history when a readout reads it.
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
        readouts: Sequence[str] = (),
        streaming: bool = False,
        newest_last: bool | None = None,
        faithful: bool = False,
        max_len: int | None = None,
        backend: str = "auto",
        check_inputs: bool = False,
        leak_target_date: bool = False,
        faithful_version: int = 2,
    ) -> None:
        super().__init__()
        if leak_target_date and not (faithful and faithful_version == 2):
            raise ValueError("leak_target_date is the paper code's protocol: set faithful=True")
        if faithful_version not in (1, 2):
            raise ValueError(f"faithful_version must be 1 or 2, got {faithful_version}")
        if faithful and max_len is None:
            raise ValueError("faithful=True fixes the padding at construction: pass max_len")
        if faithful and mask_aware:
            raise ValueError("faithful=True uses the paper's plain pooling: set mask_aware=False")
        if faithful and streaming:
            raise ValueError("faithful=True is the paper's stack, anchored at the newest item")
        if not 0.0 <= input_dropout < 1.0:
            raise ValueError(f"input_dropout must be in [0, 1), got {input_dropout}")
        self.input_dropout = input_dropout
        self.max_len, self.faithful, self.check_inputs = max_len, faithful, check_inputs
        inputs = ItemInputs(num_items, item_attributes, num_attributes, item_features, use_time)
        paper_norm = faithful and faithful_version == 2
        self.leaks_target_date = leak_target_date
        if paper_norm:
            self.item_encoder = FaithfulItemEncoder(
                inputs, d_model, max_len, dropout=dropout, leak_target_date=leak_target_date
            )
            self._unfusable = "the faithful input block"
        elif faithful:
            self.item_encoder = LegacyFaithfulItemEncoder(inputs, d_model, dropout=dropout)
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
            streaming=streaming,
            paper_norm=paper_norm,
            newest_last=newest_last,
        )
        readouts = readout_names(readouts)
        history = [name for name in readouts if READOUTS[name].reads != NEWEST]
        if streaming and history:
            raise ValueError(
                f"streaming=True gives a user vector per position, which readout {history[0]!r} "
                f"(it reads the {READOUTS[history[0]].reads}) cannot follow causally"
            )
        self.readouts = nn.ModuleDict(
            {name: READOUTS[name].build(d_model, num_items) for name in readouts}
        )
        self.set_backend(backend)
        self.register_load_state_dict_pre_hook(_rename_legacy_readout_keys)

    def check_backend_choice(self, name: str) -> None:
        if name == "triton" and self._unfusable is not None:
            raise ValueError(
                f"backend 'triton' fuses the item gather into level 1 and does not cover "
                f"{self._unfusable}: use backend='auto' or 'reference'"
            )

    def _check_length(self, item_ids: Tensor) -> None:
        if self.max_len is not None and item_ids.shape[1] > self.max_len:
            raise ValueError(f"history length {item_ids.shape[1]} exceeds max_len={self.max_len}")

    def _user_and_candidates(
        self,
        item_ids: Tensor,
        candidates: Tensor,
        timestamps: Tensor | None,
        target_timestamps: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """The faithful block encodes histories and candidates in one pass over their ids."""
        if not isinstance(self.item_encoder, FaithfulItemEncoder):
            return super()._user_and_candidates(item_ids, candidates, timestamps, target_timestamps)
        item_ids = self._checked_ids(item_ids, timestamps)
        self._check_length(item_ids)
        x, vectors = self.item_encoder.history_and_candidates(
            item_ids, item_ids != 0, timestamps, candidates, target_timestamps
        )
        x = hashed_dropout(x, self.input_dropout, self.training, self.backend)
        return self.user_from_vectors(x, item_ids), vectors

    def _encode(self, item_ids: Tensor, mask: Tensor, timestamps: Tensor | None) -> Tensor:
        self._check_length(item_ids)
        if not self._fused(item_ids.device):
            x = self.item_encoder(item_ids, mask, timestamps)
            x = hashed_dropout(x, self.input_dropout, self.training, self.backend)
            return self.user_from_vectors(x, item_ids)
        user = self.encoder.forward_ids(item_ids, self.item_encoder.tables(), mask)
        if not self.readouts:
            return user
        # the fused kernel never stores the item vectors: gather what the readouts read again
        if all(READOUTS[name].reads == NEWEST for name in self.readouts):
            item_ids, mask = item_ids[:, -1:], mask[:, -1:]
        return self._add_readouts(user, self.item_encoder(item_ids, mask), item_ids)

    def user_from_vectors(self, x: Tensor, item_ids: Tensor) -> Tensor:
        return self._add_readouts(self.encoder(x, item_ids != 0), x, item_ids)

    def push_vectors(
        self, state: StreamState, x: Tensor, item_ids: Tensor
    ) -> tuple[Tensor, StreamState]:
        """Streaming models: one new event per user, its item vector ``x`` (B, D) and id
        ``item_ids`` (B,) -> (user vectors (B, D) after it, readouts included; the new state):
        everything after the item lookup, which serving runs on a frozen table."""
        user, state = self.encoder.push(state, x)
        return self._add_readouts(user, x[:, None], item_ids[:, None]), state

    def _encode_positions(
        self, item_ids: Tensor, mask: Tensor, timestamps: Tensor | None
    ) -> Tensor:
        """Streaming models: (B, L, D), slot t the user vector of the history up to t, every
        readout (all read the newest item) applied at each slot; one pass over the history.

        On the CPU, outside ``torch.compile``, rows of very different lengths run in up to four
        passes (``length_groups``), each over its rows cut to their longest history: anchored
        at the first event, a row's vectors do not depend on the padding before it, so the
        result is the one pass's (a batch of Beauty's windows pads four fifths of its slots)."""
        if not self.encoder.streaming:
            raise TypeError(
                "ConvRec encodes a history into one vector, not one per position: build it "
                "with streaming=True, or train with train_sampling='all-prefixes' or 'random-cut'"
            )
        # not under torch.compile, whose step keeps static shapes (a group's length would
        # compile again)
        grouping = item_ids.device.type == "cpu" and not torch.compiler.is_compiling()
        groups = length_groups(mask) if grouping else []
        if len(groups) < 2:
            return self._encode_window_positions(item_ids, mask, timestamps)
        out = None
        for rows, length in groups:
            part = self._encode_window_positions(
                item_ids[rows, -length:],
                mask[rows, -length:],
                None if timestamps is None else timestamps[rows, -length:],
            )
            if out is None:
                out = part.new_zeros(*item_ids.shape, part.shape[-1])
            out[rows, -length:] = part
        return out

    def _encode_window_positions(
        self, item_ids: Tensor, mask: Tensor, timestamps: Tensor | None
    ) -> Tensor:
        """``_encode_positions`` of a batch in one pass."""
        x = self.item_encoder(item_ids, mask, timestamps)
        x = hashed_dropout(x, self.input_dropout, self.training, self.backend)
        users = self.encoder.forward_positions(x, mask)
        if not self.readouts:
            return users
        batch, length, d = x.shape
        slots = (users.reshape(-1, d), x.reshape(-1, 1, d), item_ids.reshape(-1, 1))
        return self._add_readouts(*slots).view(batch, length, d) * mask[..., None].to(x.dtype)

    def _add_readouts(self, user: Tensor, x: Tensor, item_ids: Tensor) -> Tensor:
        """``user`` plus every readout's term, in the registry's order; ``x`` (B, L, D) zero at
        padding and ``item_ids`` (B, L) as in ``convrec.readouts.Readout``."""
        for readout in self.readouts.values():
            user = user + readout(user, x, item_ids)
        return user

    def _fused(self, device: torch.device) -> bool:
        """Whether level 1 runs as ``embed_conv_pool``: on Triton, for what the kernel covers.

        The faithful block and the streaming stack are never fused, so they warn about nothing.
        """
        if self.faithful or self.encoder.streaming:
            return False
        if self.encoder.backend_for(device) != "triton":
            return False
        if self.training and self.input_dropout > 0:
            return False  # the dropped vectors must exist: see the class docstring
        if self._unfusable is not None:  # only "auto" gets here (see __init__)
            warn_once(
                f"convrec: ConvRec gathers items unfused: the fused kernel lacks {self._unfusable}"
            )
            return False
        return True


def _rename_legacy_readout_keys(module: nn.Module, state: dict, prefix: str, *_) -> None:
    """Checkpoints written before the readout registry name the readouts' tensors otherwise."""
    upgrade_state_dict(state, prefix)


def length_groups(mask: Tensor, most: int = 4) -> list[tuple[Tensor, int]]:
    """Rows of a left-padded (B, L) ``mask`` grouped by history length for separate passes:
    (row indices, the group's longest history) for lengths in (M / 2, M], (M / 4, M / 2], ...,
    the last of the ``most`` groups taking every shorter row (M the longest; empty groups and
    empty rows left out). Each pass computes at most twice its rows' real slots, but the last."""
    lengths = mask.sum(1)
    longest = int(lengths.max()) if lengths.numel() else 0
    groups, upper = [], longest
    for number in range(most):
        lower = 0 if number == most - 1 else upper // 2
        rows = torch.nonzero((lengths > lower) & (lengths <= upper)).flatten()
        if rows.numel():
            groups.append((rows, int(lengths[rows].max())))
        upper = lower
        if upper == 0:
            break
    return groups
