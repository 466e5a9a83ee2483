"""convrec: ConvRec, the convolutional linear-cost alternative to self-attention for
attribute-aware sequential recommendation (Elsayed et al., IJCAI-ECAI 2026)."""

from convrec import ops
from convrec.baselines import SASRec, TransformerEncoder
from convrec.encoder import ConvRecEncoder
from convrec.model import ConvRec
from convrec.schedule import DEFAULT_LEVELS, schedule_for_length

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LEVELS",
    "ConvRec",
    "ConvRecEncoder",
    "SASRec",
    "TransformerEncoder",
    "__version__",
    "ops",
    "schedule_for_length",
]
