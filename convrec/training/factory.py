"""Model specs: what a checkpoint needs to rebuild its model alone (see ``convrec.registry``)."""

from __future__ import annotations

import torch

from convrec.data.dataset import SequenceDataset
from convrec.schedule import DEFAULT_LEVELS
from convrec.training.config import TrainConfig


def model_spec(config: TrainConfig, data: SequenceDataset) -> dict:
    """Constructor name, keyword arguments and the attribute index of the configured model."""
    if config.use_time and data.timestamps is None:
        raise ValueError(f"use_time is set but {data.name} has no timestamps")
    with_attributes = config.use_attributes and data.num_attributes > 0
    convrec = config.model == "convrec"
    dropout = config.dropout if config.dropout is not None else (0.1 if convrec else 0.2)
    heads = config.heads if config.heads is not None else (1 if convrec else 2)
    common = dict(num_items=data.num_items, d_model=config.d_model, dropout=dropout, heads=heads)
    if convrec:
        kwargs = dict(
            common,
            levels=[list(level) for level in (config.levels or DEFAULT_LEVELS)],
            mask_aware=config.mask_aware,
            input_dropout=config.input_dropout,
            readouts=list(config.readouts),
            streaming=config.streaming,
            newest_last=config.newest_last,
            faithful=config.faithful,
            max_len=config.max_len if config.faithful else None,
            backend=config.backend,
            leak_target_date=config.leak_target_date,
        )
        if config.faithful:
            kwargs["faithful_version"] = 2
    else:
        kwargs = dict(common, max_len=config.max_len, num_blocks=config.blocks)
    kwargs.update(use_time=config.use_time)
    if with_attributes:
        kwargs["num_attributes"] = data.num_attributes
    return {
        "kind": config.model,
        "kwargs": kwargs,
        "attr_offsets": torch.from_numpy(data.attr_offsets) if with_attributes else None,
        "attr_ids": torch.from_numpy(data.attr_ids) if with_attributes else None,
    }
