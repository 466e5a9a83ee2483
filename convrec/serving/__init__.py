"""Serving: the ``Recommender`` helper and exports (torch.export, ONNX). No training imports."""

from convrec.serving.export import FORMATS, export_model
from convrec.serving.module import ServingModule
from convrec.serving.recommender import Recommender

__all__ = ["FORMATS", "Recommender", "ServingModule", "export_model"]
