"""Evaluation protocols (full ranking, sampled negatives) and ranking metrics."""

from convrec.evaluation.metrics import KS, rank_of_target, ranking_metrics
from convrec.evaluation.protocols import PROTOCOLS, describe_protocol, evaluate, format_metrics

__all__ = [
    "KS",
    "PROTOCOLS",
    "describe_protocol",
    "evaluate",
    "format_metrics",
    "rank_of_target",
    "ranking_metrics",
]
