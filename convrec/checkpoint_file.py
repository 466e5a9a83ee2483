"""Reading a convrec checkpoint file safely: tensors and plain data only, never code.

``torch.load`` unpickles, and a pickle can name any callable to run while it loads. Every
checkpoint convrec writes holds only tensors, numbers, strings, lists, tuples and dicts, so it
loads with ``weights_only=True``, whose unpickler refuses everything else. A file that asks for
more is refused with one line, before any of its objects are built. Shared by training (resume,
evaluate) and serving (``Recommender``, export), so neither can load a checkpoint the unsafe way.
"""

from __future__ import annotations

import pathlib
import re

import torch

# How torch's weights-only unpickler names a callable it refused to import.
_BLOCKED_GLOBAL = re.compile(r"unsupported GLOBAL (\S+?)[,.]?\s")


class CheckpointError(ValueError):
    """A file that is not a convrec checkpoint, or one that would run code when loaded."""


def load_checkpoint(path: str | pathlib.Path, map_location: str | torch.device = "cpu") -> dict:
    """The payload of a checkpoint written by ``convrec train`` (tensors on ``map_location``).

    Raises ``FileNotFoundError`` when ``path`` does not exist and ``CheckpointError`` (one line,
    naming the file) when it is not a convrec checkpoint or holds objects other than plain data.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for foreign bytes; all mean the same
        refused = _BLOCKED_GLOBAL.search(str(error))
        if refused is not None:
            raise CheckpointError(
                f"{path} is refused: it asks to run {refused.group(1)} while loading, and a "
                "convrec checkpoint holds only tensors and plain data"
            ) from None
        raise CheckpointError(
            f"{path} is not a convrec checkpoint: torch cannot read it ({type(error).__name__})"
        ) from None
    if not isinstance(payload, dict) or "model_spec" not in payload:
        raise CheckpointError(f"{path} is not a convrec checkpoint (no model spec in it)")
    return payload
