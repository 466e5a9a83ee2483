"""Datasets: loaders for S3-Rec, RecBole and MovieLens files, a synthetic generator, splits.

Depends on no model code."""

from convrec.data.dataset import DataFormatError, SequenceDataset
from convrec.data.load import FORMATS, detect_format, load_dataset
from convrec.data.synthetic import synthetic_dataset

__all__ = [
    "FORMATS",
    "DataFormatError",
    "SequenceDataset",
    "detect_format",
    "load_dataset",
    "synthetic_dataset",
]
