"""Rebuild a model from the spec a checkpoint stores (constructor name, kwargs, attribute index).

Kept outside ``convrec.training`` so serving can load checkpoints without training code. Specs
written before the readout registry (one boolean keyword per readout) are upgraded here; their
state_dict keys are renamed by ``ConvRec`` itself when it loads them. Faithful specs without a
``faithful_version`` hold the earlier approximation of the paper's block (version 1). Specs
store ``newest_last`` resolved (a bool); one without it, or with None, was written when a
streaming model's open windows defaulted to the in-place layout, which it keeps.
"""

from __future__ import annotations

from convrec.baselines.sasrec import SASRec
from convrec.model import ConvRec
from convrec.readouts import upgrade_flags
from convrec.recommender import SequentialRecommender

MODELS = {"convrec": ConvRec, "sasrec": SASRec}


def build_model(spec: dict) -> SequentialRecommender:
    if spec["kind"] not in MODELS:
        raise ValueError(f"unknown model kind {spec['kind']!r}; known: {', '.join(MODELS)}")
    attributes = None
    if spec["attr_offsets"] is not None:
        attributes = (spec["attr_offsets"], spec["attr_ids"])
    kwargs = upgrade_flags(spec["kwargs"]) if spec["kind"] == "convrec" else spec["kwargs"]
    if kwargs.get("faithful") and "faithful_version" not in kwargs:
        kwargs = dict(kwargs, faithful_version=1)  # written before the paper's block was exact
    if spec["kind"] == "convrec" and kwargs.get("newest_last") is None:
        kwargs = dict(kwargs, newest_last=False)  # written when the in-place layout was the default
    return MODELS[spec["kind"]](**kwargs, item_attributes=attributes)
