"""``ConvRec``: item encoder + ``ConvRecEncoder`` + dot-product scoring (DESIGN.md section 1)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from convrec.encoder import ConvRecEncoder
from convrec.item_encoder import FaithfulItemEncoder, ItemAttributes, ItemEncoder
from convrec.recommender import SequentialRecommender
from convrec.schedule import DEFAULT_LEVELS


class ConvRec(SequentialRecommender):
    """The ConvRec recommender.

    ``item_attributes``: CSR ``(offsets (N + 2,), ids)`` or a list of attribute-id lists indexed
    by item id (row 0 = padding); ``item_features``: a dense frozen (N + 1, F) matrix (e.g. image
    features); ``use_time``: add time context from timestamps. ``faithful=True`` uses the paper
    code's input block and its padding fixed at construction from ``max_len`` (required then).
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
        self.max_len, self.faithful, self.check_inputs = max_len, faithful, check_inputs
        inputs = dict(
            item_attributes=item_attributes,
            num_attributes=num_attributes,
            item_features=item_features,
            use_time=use_time,
        )
        if faithful:
            self.item_encoder = FaithfulItemEncoder(num_items, d_model, dropout=dropout, **inputs)
        else:
            self.item_encoder = ItemEncoder(num_items, d_model, **inputs)
        self.encoder = ConvRecEncoder(
            d_model,
            levels,
            heads=heads,
            dropout=dropout,
            mask_aware=mask_aware,
            backend=backend,
            fixed_length=max_len if faithful else None,
            check_inputs=check_inputs,
        )

    def _encode(self, item_ids: Tensor, mask: Tensor, timestamps: Tensor | None) -> Tensor:
        if self.max_len is not None and item_ids.shape[1] > self.max_len:
            raise ValueError(f"history length {item_ids.shape[1]} exceeds max_len={self.max_len}")
        return self.encoder(self.item_encoder(item_ids, mask, timestamps), mask)
