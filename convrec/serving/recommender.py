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
from convrec.serving.export import METADATA_KEY
from convrec.serving.module import ServingModule


class Recommender:
    """Load once, then ``recommend(histories, k)`` for many users at a time.

    ``histories`` are lists of original item ids, oldest first. Checkpoints run eagerly with any
    ``k``; exports return at most the ``k`` they were exported with.
    """

    def __init__(self, path: str | pathlib.Path, max_k: int = 100) -> None:
        path = pathlib.Path(path)
        if path.suffix == ".pt2":
            extra = {METADATA_KEY: ""}
            program = torch.export.load(str(path), extra_files=extra)
            self.meta = json.loads(extra[METADATA_KEY])
            self._run = self._eager(program.module())
        elif path.suffix == ".onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.meta = json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
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
        """Original ids -> a left-padded (B, L) tensor of internal ids; unknown ids raise."""
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
        """Top-``k`` (item id, score) per history, best first."""
        if not 1 <= k <= self.meta["k"]:
            raise ValueError(f"k must be in [1, {self.meta['k']}] for this model, got {k}")
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
                    ]
                )
        return results
