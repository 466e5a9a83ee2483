"""Baselines trained and measured in the same harness as ConvRec."""

from convrec.baselines.sasrec import SASRec, TransformerEncoder

__all__ = ["SASRec", "TransformerEncoder"]
