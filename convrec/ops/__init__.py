"""ConvRec operators. Each module holds one op: its pure-PyTorch reference (the test oracle and
CPU fallback) and, as they land, the dispatch to its fast paths."""

from convrec.ops.conv_pool import ConvPoolOutput, conv_pool
from convrec.ops.downscale import DownscaleOutput, LevelParams, downscale, downscale_reference
from convrec.ops.gather_embed import attribute_bags, gather_embed

__all__ = [
    "ConvPoolOutput",
    "DownscaleOutput",
    "LevelParams",
    "attribute_bags",
    "conv_pool",
    "downscale",
    "downscale_reference",
    "gather_embed",
]
