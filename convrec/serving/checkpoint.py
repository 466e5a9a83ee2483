"""Read a training checkpoint for inference without importing the training code."""

from __future__ import annotations

import pathlib

from convrec.checkpoint_file import load_checkpoint
from convrec.recommender import SequentialRecommender
from convrec.registry import build_model


def load_model(path: str | pathlib.Path) -> tuple[SequentialRecommender, dict]:
    """The model in eval mode and its serving metadata (item ids, max_len, model kind)."""
    payload = load_checkpoint(path)
    model = build_model(payload["model_spec"])
    model.load_state_dict(payload["model"])
    model.eval()
    meta = {
        "item_ids": payload["item_ids"],
        "max_len": payload["config"]["max_len"],
        "model": payload["model_spec"]["kind"],
    }
    return model, meta
