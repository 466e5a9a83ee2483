"""``convrec export``: a trained checkpoint as a torch.export program or an ONNX model.

Both carry what serving needs besides the graph (original item ids, k, max_len) as JSON:
an extra file of the ``.pt2`` archive, or ONNX metadata.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pathlib
import secrets
import sys
import warnings

import torch

from convrec.serving.checkpoint import load_model
from convrec.serving.module import ServingModule

FORMATS = ("torch-export", "onnx")
SUFFIXES = {"torch-export": ".pt2", "onnx": ".onnx"}
METADATA_KEY = "convrec.json"


def _example(max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(1, 2 * max_len + 1).remainder(7).add(1).view(2, max_len)
    return ids, ids[:, :3].clone()


def _dynamic_shapes() -> dict:
    batch, length, excluded = (torch.export.Dim(n, min=1) for n in ("batch", "length", "excluded"))
    return {"item_ids": {0: batch, 1: length}, "exclude": {0: batch, 1: excluded}}


class ExportError(ValueError):
    """A file that is not a convrec export (or is broken); the message names it."""


def check_export_path(fmt: str, out: str | pathlib.Path) -> pathlib.Path:
    """``out`` as a path, refused (one line) when its suffix disagrees with ``fmt`` or its folder
    cannot be written, before any work is done."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    out = pathlib.Path(out)
    if out.suffix != SUFFIXES[fmt]:
        raise ValueError(
            f"--format {fmt} writes a {SUFFIXES[fmt]} file, but --out {out} ends in "
            f"{out.suffix or 'no suffix'}: name it {out.with_suffix(SUFFIXES[fmt]).name}"
        )
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name the file to write")
    folder = next((p for p in out.parents if p.exists()), pathlib.Path("."))
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {out}: {folder} is not a writable folder")
    return out


@contextlib.contextmanager
def _quiet_unless_failed():
    """Hold back what the exporters print and warn; replay it on stderr only if they fail."""
    printed = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(printed),
            contextlib.redirect_stderr(printed),
        ):
            warnings.simplefilter("always")
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            yield
    except BaseException:
        sys.stderr.write(printed.getvalue())
        for warning in caught:
            sys.stderr.write(f"{warning.category.__name__}: {warning.message}\n")
        raise
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _replace_atomically(out: pathlib.Path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``out``, then rename it over ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}{out.suffix}")
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_model(
    checkpoint: str | pathlib.Path, fmt: str, out: str | pathlib.Path, k: int = 100
) -> None:
    """Write the serving graph of ``checkpoint`` to ``out`` in ``fmt`` (see ``FORMATS``).

    ``out`` must end in ``.pt2`` (torch-export) or ``.onnx``; it is written once, atomically
    (a temporary file renamed over it), and the exporters' chatter is shown only on failure.
    """
    out = check_export_path(fmt, out)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    model, meta = load_model(checkpoint)
    k = min(k, model.num_items)
    serving = ServingModule(model, meta["max_len"], k, portable=True).eval()
    info = json.dumps(dict(meta, k=k))
    example = _example(meta["max_len"])
    with _quiet_unless_failed():
        if fmt == "torch-export":
            program = torch.export.export(serving, example, dynamic_shapes=_dynamic_shapes())
            _replace_atomically(
                out,
                lambda tmp: torch.export.save(program, str(tmp), extra_files={METADATA_KEY: info}),
            )
            return
        program = torch.onnx.export(
            serving,
            example,
            input_names=["item_ids", "exclude"],
            output_names=["user", "scores", "items"],
            dynamic_shapes=_dynamic_shapes(),
            dynamo=True,
        )
        program.model.metadata_props[METADATA_KEY] = info
        _replace_atomically(out, lambda tmp: program.save(str(tmp), external_data=False))
