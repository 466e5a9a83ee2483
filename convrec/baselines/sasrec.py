"""SASRec-style causal transformer, the attention baseline in the same harness as ConvRec.

Pre-LN blocks, learned positions counted from the newest item, and the same item encoder,
scoring and ``recommend`` as ``ConvRec``. ``attention="sdpa"`` calls
``F.scaled_dot_product_attention`` with ``is_causal=True`` (memory linear in L where the kernel
allows); ``attention="naive"`` materialises the (L, L) scores, as the cost of attention is
usually quoted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convrec.item_encoder import ItemAttributes, ItemEncoder, ItemInputs
from convrec.recommender import SequentialRecommender

# Added to q.k for padded keys through one extra head dimension: exp() of it underflows to 0
# in every float dtype, so padding is masked exactly without an (L, L) mask tensor.
_PAD_KEY_BIAS = -1.0e4


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention that ignores left-padded keys."""

    def __init__(self, d_model: int, heads: int, dropout: float, attention: str) -> None:
        """``dropout`` applies to the attention weights (0 keeps SDPA on its fused kernels)."""
        super().__init__()
        if attention not in ("sdpa", "naive"):
            raise ValueError(f"attention must be 'sdpa' or 'naive', got {attention!r}")
        self.heads, self.attention, self.dropout = heads, attention, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        batch, length, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scale = 1.0 / math.sqrt(q.shape[-1])
        p = self.dropout if self.training else 0.0
        if self.attention == "sdpa":
            # one extra dimension: q gets 1, k gets 0 (real) or the pad bias (padded key); v gets
            # 0 so all three keep one head size, which the fused (flash) kernels require
            pad_bias = (~mask).to(q.dtype).mul(_PAD_KEY_BIAS)[:, None, :, None]
            q = torch.cat([q, torch.ones_like(q[..., :1])], dim=-1)
            k = torch.cat([k, pad_bias.expand(-1, self.heads, -1, -1)], dim=-1)
            v = torch.cat([v, torch.zeros_like(v[..., :1])], dim=-1)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scale)
            y = y[..., :-1]
        else:
            scores = (q @ k.transpose(-2, -1)) * scale
            future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
            blocked = future | ~mask[:, None, None, :]
            # a padded query sees only itself, so its softmax row is never empty
            blocked = blocked & ~torch.eye(length, dtype=torch.bool, device=x.device)
            weights = F.dropout(scores.masked_fill(blocked, float("-inf")).softmax(-1), p)
            y = weights @ v
        return self.out(y.transpose(1, 2).reshape(batch, length, d_model))


class TransformerBlock(nn.Module):
    def __init__(
        self, d_model: int, heads: int, dropout: float, attention_dropout: float, attention: str
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, attention_dropout, attention)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, d_model), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_model, d_model)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), mask))
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x * mask.unsqueeze(-1).to(x.dtype)


class TransformerEncoder(nn.Module):
    """The attention counterpart of ``ConvRecEncoder``: (B, L, D) + mask -> (B, D).

    Learned positions counted from the newest item, pre-LN causal blocks, a final LayerNorm and
    the newest position as the user vector (zero for an all-padding row). ``dropout`` acts on
    the inputs and residual branches; ``attention_dropout`` on the attention weights is off by
    default because no fused SDPA kernel supports it.
    """

    def __init__(
        self,
        d_model: int,
        max_len: int = 200,
        num_blocks: int = 2,
        heads: int = 2,
        dropout: float = 0.2,
        attention: str = "sdpa",
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if heads < 1 or d_model % heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by heads={heads}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.max_len = max_len
        self.positions = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, heads, dropout, attention_dropout, attention)
            for _ in range(num_blocks)
        )
        self.final_norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, mask: Tensor, every_position: bool = False) -> Tensor:
        """(B, D) from the newest slot, or (B, L, D) from every slot with ``every_position``."""
        length = x.shape[1]
        if length > self.max_len:
            raise ValueError(f"history length {length} exceeds max_len={self.max_len}")
        # position max_len - 1 is always the newest item, whatever the batch length
        positions = torch.arange(self.max_len - length, self.max_len, device=x.device)
        keep = mask.unsqueeze(-1).to(x.dtype)
        x = self.input_dropout(x * keep + self.positions(positions)) * keep
        for block in self.blocks:
            x = block(x, mask)
        if every_position:
            return self.final_norm(x) * keep
        return self.final_norm(x[:, -1]) * keep[:, -1]


class SASRec(SequentialRecommender):
    """Self-attentive sequential recommendation (Kang & McAuley, ICDM 2018), pre-LN variant."""

    def __init__(
        self,
        num_items: int,
        d_model: int = 64,
        max_len: int = 200,
        num_blocks: int = 2,
        heads: int = 2,
        dropout: float = 0.2,
        attention: str = "sdpa",
        attention_dropout: float = 0.0,
        *,
        item_attributes: ItemAttributes | None = None,
        num_attributes: int | None = None,
        item_features: Tensor | None = None,
        use_time: bool = False,
        check_inputs: bool = False,
    ) -> None:
        super().__init__()
        self.max_len, self.check_inputs = max_len, check_inputs
        inputs = ItemInputs(num_items, item_attributes, num_attributes, item_features, use_time)
        self.item_encoder = ItemEncoder(inputs, d_model)
        self.encoder = TransformerEncoder(
            d_model, max_len, num_blocks, heads, dropout, attention, attention_dropout
        )

    def _encode(self, item_ids: Tensor, mask: Tensor, timestamps: Tensor | None) -> Tensor:
        return self.user_from_vectors(self.item_encoder(item_ids, mask, timestamps), item_ids)

    def _encode_positions(
        self, item_ids: Tensor, mask: Tensor, timestamps: Tensor | None
    ) -> Tensor:
        x = self.item_encoder(item_ids, mask, timestamps)
        return self.encoder(x, mask, every_position=True)
