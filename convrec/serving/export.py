"""``convrec export``: a trained checkpoint as a torch.export program or an ONNX model.

Both carry what serving needs besides the graph (original item ids, k, max_len) as JSON:
an extra file of the ``.pt2`` archive, or ONNX metadata.
"""

from __future__ import annotations

import json
import pathlib

import torch

from convrec.serving.checkpoint import load_model
from convrec.serving.module import ServingModule

FORMATS = ("torch-export", "onnx")
METADATA_KEY = "convrec.json"


def _example(max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(1, 2 * max_len + 1).remainder(7).add(1).view(2, max_len)
    return ids, ids[:, :3].clone()


def _dynamic_shapes() -> dict:
    batch, length, excluded = (torch.export.Dim(n, min=1) for n in ("batch", "length", "excluded"))
    return {"item_ids": {0: batch, 1: length}, "exclude": {0: batch, 1: excluded}}


def export_model(
    checkpoint: str | pathlib.Path, fmt: str, out: str | pathlib.Path, k: int = 100
) -> None:
    """Write the serving graph of ``checkpoint`` to ``out`` in ``fmt`` (see ``FORMATS``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    model, meta = load_model(checkpoint)
    k = min(k, model.num_items)
    serving = ServingModule(model, meta["max_len"], k, portable=True).eval()
    info = json.dumps(dict(meta, k=k))
    example = _example(meta["max_len"])
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torch-export":
        program = torch.export.export(serving, example, dynamic_shapes=_dynamic_shapes())
        torch.export.save(program, str(out), extra_files={METADATA_KEY: info})
        return
    import onnx

    torch.onnx.export(
        serving,
        example,
        str(out),
        input_names=["item_ids", "exclude"],
        output_names=["user", "scores", "items"],
        dynamic_shapes=_dynamic_shapes(),
        dynamo=True,
        external_data=False,
    )
    proto = onnx.load(str(out))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, info
    onnx.save(proto, str(out))
