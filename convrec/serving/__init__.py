"""Serving: the ``Recommender`` helper and exports (torch.export, ONNX). No training imports."""

from convrec.serving.export import FORMATS, export_model
from convrec.serving.module import ServingModule
from convrec.serving.recommender import Recommender
from convrec.serving.streaming import StreamingModule, StreamingRecommender

__all__ = [
    "FORMATS",
    "Recommender",
    "ServingModule",
    "StreamingModule",
    "StreamingRecommender",
    "export_model",
]
