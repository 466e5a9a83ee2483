"""Evaluation protocols (full ranking, sampled negatives) and ranking metrics."""

from convrec.evaluation.metrics import KS, RankingMetrics, rank_of_target
from convrec.evaluation.protocols import PROTOCOLS, describe_protocol, evaluate, format_metrics

__all__ = [
    "KS",
    "PROTOCOLS",
    "RankingMetrics",
    "describe_protocol",
    "evaluate",
    "format_metrics",
    "rank_of_target",
]
