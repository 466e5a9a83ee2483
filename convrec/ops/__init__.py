"""ConvRec operators. Each module holds one op: its pure-PyTorch reference (the test oracle and
CPU fallback), the dispatch to its fast paths and, for the Triton ones, the ``torch.library``
registration under ``torch.ops.convrec.*``."""

from convrec.ops.all_items import (
    all_items_cross_entropy,
    all_items_cross_entropy_reference,
    score_all_items,
)
from convrec.ops.bags_of_rows import bags_of_rows, bags_of_rows_reference
from convrec.ops.conv_pool import ConvPoolOutput, conv_pool, conv_pool_reference
from convrec.ops.downscale import DownscaleOutput, downscale, downscale_reference
from convrec.ops.embed_conv_pool import embed_conv_pool, embed_conv_pool_reference
from convrec.ops.embedding_rows import embedding_rows, embedding_rows_reference
from convrec.ops.gather_embed import attribute_bags, gather_embed, gather_embed_reference
from convrec.ops.gelu_paper_norm import gelu_paper_norm, gelu_paper_norm_reference
from convrec.ops.item_tables import ItemTables
from convrec.ops.level_params import LevelParams, PackedLevels, pack_levels
from convrec.ops.rows_with_context import rows_with_context, rows_with_context_reference
from convrec.ops.stack_dropout import StackDropout
from convrec.ops.stream_downscale import (
    StreamState,
    stream_downscale,
    stream_downscale_reference,
    stream_push,
    stream_state,
)

__all__ = [
    "ConvPoolOutput",
    "DownscaleOutput",
    "ItemTables",
    "LevelParams",
    "PackedLevels",
    "StackDropout",
    "StreamState",
    "all_items_cross_entropy",
    "all_items_cross_entropy_reference",
    "attribute_bags",
    "bags_of_rows",
    "bags_of_rows_reference",
    "conv_pool",
    "conv_pool_reference",
    "downscale",
    "downscale_reference",
    "embed_conv_pool",
    "embed_conv_pool_reference",
    "embedding_rows",
    "embedding_rows_reference",
    "gather_embed",
    "gather_embed_reference",
    "gelu_paper_norm",
    "gelu_paper_norm_reference",
    "pack_levels",
    "rows_with_context",
    "rows_with_context_reference",
    "score_all_items",
    "stream_downscale",
    "stream_downscale_reference",
    "stream_push",
    "stream_state",
]
