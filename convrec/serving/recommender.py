"""``Recommender``: batched top-k recommendations in original item ids, from a checkpoint, a
torch.export program (``.pt2``) or an ONNX model (``.onnx``, needs onnxruntime)."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np
import torch

from convrec.recommender import SequentialRecommender
from convrec.serving.checkpoint import load_model
from convrec.serving.export import METADATA_KEY, ExportError
from convrec.serving.module import ServingModule


class Recommender:
    """Load once, then ``recommend(histories, k)`` for many users at a time.

    ``histories`` are lists of original item ids, oldest first. Checkpoints run eagerly with any
    ``k``; exports return at most the ``k`` they were exported with. A file that is not a
    convrec checkpoint or export raises ``CheckpointError`` / ``ExportError`` (one line).
    """

    def __init__(self, path: str | pathlib.Path, max_k: int = 100) -> None:
        path = pathlib.Path(path)
        if path.suffix in (".pt2", ".onnx") and not path.is_file():
            raise FileNotFoundError(f"export {path} does not exist")
        if path.suffix == ".pt2":
            extra = {METADATA_KEY: ""}
            try:
                program = torch.export.load(str(path), extra_files=extra)
            except Exception as error:  # zip, pickle and schema errors all mean "not ours"
                raise ExportError(
                    f"{path} is not a convrec export: torch.export cannot read it "
                    f"({type(error).__name__})"
                ) from None
            self.meta = _metadata(path, extra[METADATA_KEY])
            self._run = self._eager(program.module())
        elif path.suffix == ".onnx":
            import onnxruntime

            try:
                session = onnxruntime.InferenceSession(
                    str(path), providers=["CPUExecutionProvider"]
                )
            except Exception as error:
                raise ExportError(
                    f"{path} is not a convrec export: onnxruntime cannot read it "
                    f"({type(error).__name__})"
                ) from None
            custom = session.get_modelmeta().custom_metadata_map
            self.meta = _metadata(path, custom.get(METADATA_KEY, ""))
            self._run = lambda ids, exclude: session.run(
                None, {"item_ids": ids.numpy(), "exclude": exclude.numpy()}
            )
        else:
            model, self.meta = load_model(path)
            module = ServingModule(model, self.meta["max_len"], min(max_k, model.num_items))
            self.meta["k"] = module.k
            self._run = self._eager(module)
        self._set_index()

    @classmethod
    def from_model(
        cls, model: SequentialRecommender, item_ids: list[str], max_len: int, max_k: int = 100
    ) -> Recommender:
        """Serve a model held in memory; ``item_ids[i]`` is the original id of item i (0 = "")."""
        if len(item_ids) != model.num_items + 1:
            raise ValueError(f"{len(item_ids)} item ids for a model of {model.num_items} items")
        self = cls.__new__(cls)
        module = ServingModule(model.eval(), max_len, min(max_k, model.num_items))
        self.meta = {"item_ids": list(item_ids), "max_len": max_len, "k": module.k}
        self._run = self._eager(module)
        self._set_index()
        return self

    def _set_index(self) -> None:
        self.item_ids: list[str] = self.meta["item_ids"]
        self._index = {orig: i for i, orig in enumerate(self.item_ids) if i > 0}

    @staticmethod
    def _eager(module: torch.nn.Module):
        @torch.no_grad()
        def run(ids: torch.Tensor, exclude: torch.Tensor) -> list[np.ndarray]:
            return [t.numpy() for t in module(ids, exclude)]

        return run

    def encode_histories(self, histories: Sequence[Sequence[str | int]]) -> torch.Tensor:
        """Original ids -> a left-padded (B, L) tensor of internal ids; unknown ids raise, and so
        does a string where a history (a list of ids) is expected."""
        _check_histories(histories)
        rows = []
        for number, history in enumerate(histories):
            unknown = [h for h in history if str(h) not in self._index]
            if unknown:
                raise ValueError(f"history {number} holds unknown item ids: {unknown[:5]}")
            rows.append([self._index[str(h)] for h in history])
        width = max(max((len(r) for r in rows), default=1), 1)
        return torch.tensor([[0] * (width - len(r)) + r for r in rows], dtype=torch.long)

    def recommend(
        self,
        histories: Sequence[Sequence[str | int]],
        k: int = 10,
        exclude_seen: bool = True,
        batch_size: int = 256,
    ) -> list[list[tuple[str, float]]]:
        """Top-``k`` (item id, score) per history, best first.

        With ``exclude_seen`` a history's own items are never returned, so when fewer than ``k``
        items are left for it the list is shorter than ``k``.
        """
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an integer, got {type(k).__name__} {k!r}")
        if not 1 <= k <= self.meta["k"]:
            raise ValueError(f"k must be in [1, {self.meta['k']}] for this model, got {k}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        _check_histories(histories)
        results: list[list[tuple[str, float]]] = []
        for start in range(0, len(histories), batch_size):
            ids = self.encode_histories(histories[start : start + batch_size])
            exclude = ids if exclude_seen else torch.zeros(len(ids), 1, dtype=torch.long)
            _, scores, items = self._run(ids, exclude)
            for row_scores, row_items in zip(scores[:, :k], items[:, :k], strict=True):
                results.append(
                    [
                        (self.item_ids[int(i)], float(s))
                        for i, s in zip(row_items, row_scores, strict=True)
                        if s != -np.inf  # excluded: fewer than k items were left
                    ]
                )
        return results


def _check_histories(histories: object) -> None:
    """A list of histories, each a list of ids: a string is refused wherever a list is expected
    (``["12", "873"]`` would otherwise read as two histories of single characters)."""
    if not _list_like(histories):
        raise TypeError(
            f"histories must be a list of histories (lists of item ids), got "
            f"{type(histories).__name__}: e.g. [['12', '873']]"
        )
    for number, history in enumerate(histories):
        if not _list_like(history):
            raise TypeError(
                f"history {number} is {type(history).__name__} {history!r}, not a list of "
                "item ids: pass a list of histories, e.g. [['12', '873']] for one user"
            )


def _list_like(value: object) -> bool:
    return (
        not isinstance(value, str | bytes)
        and hasattr(value, "__len__")
        and hasattr(value, "__iter__")
    )


def _metadata(path: pathlib.Path, text: str) -> dict:
    """The convrec metadata of an export, or ``ExportError`` when it has none (or bad)."""
    try:
        meta = json.loads(text) if text else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or not {"item_ids", "max_len", "k"} <= set(meta):
        raise ExportError(f"{path} is not a convrec export (no {METADATA_KEY} metadata in it)")
    return meta
