"""Exports (torch.export, ONNX) and the Recommender agree with the eager model, on history
lengths the export never saw, for ConvRec (plain, and with every readout) and SASRec."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F

from convrec.cli import main
from convrec.readouts import READOUTS
from convrec.serving import Recommender, ServingModule
from convrec.serving.checkpoint import load_model
from convrec.training import TrainConfig, train

TINY = {"num_users": 100, "num_items": 300, "mean_length": 10, "max_length": 30, "seed": 6}
HAS_ONNXRUNTIME = importlib.util.find_spec("onnxruntime") is not None


@pytest.fixture(scope="module", params=["convrec", "convrec-readouts", "sasrec"])
def checkpoint(request, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp(request.param)
    model, _, option = request.param.partition("-")
    config = TrainConfig(
        synthetic=TINY,
        model=model,
        readouts=list(READOUTS) if option == "readouts" else [],
        epochs=1,
        d_model=16,
        max_len=12,
        backend="reference",
    )
    train(config, out, progress=False, echo=lambda _m: None)
    return out / "best.pt"


def _histories(num_items: int, length: int, batch: int = 3) -> torch.Tensor:
    ids = torch.randint(1, num_items + 1, (batch, length))
    ids[0, : length // 2] = 0
    return ids


def test_serving_module_equals_the_model(checkpoint: pathlib.Path) -> None:
    model, meta = load_model(checkpoint)
    serving = ServingModule(model, meta["max_len"], k=5)
    for length in (1, 12, 30):
        ids = _histories(model.num_items, length)
        user, scores, items = serving(ids, ids)
        fitted = F.pad(ids, (12, 0))[:, -12:]
        torch.testing.assert_close(user, model.encode(fitted))
        expected_scores, expected_items = model.recommend(fitted, k=5, exclude=ids)
        torch.testing.assert_close(scores, expected_scores)
        assert torch.equal(items, expected_items)


@pytest.mark.parametrize("fmt", ["torch-export", "onnx"])
def test_exports_match_eager(checkpoint: pathlib.Path, fmt: str, tmp_path: pathlib.Path) -> None:
    if fmt == "onnx" and not HAS_ONNXRUNTIME:
        pytest.skip("onnxruntime is not installed")
    path = tmp_path / ("model.pt2" if fmt == "torch-export" else "model.onnx")
    main(
        ["export", "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(path), "--k", "8"]
    )
    eager, exported = Recommender(checkpoint), Recommender(path)
    ids = eager.item_ids[1:]
    # lengths the export never saw: shorter and longer than max_len (12), batch sizes 1 and 4
    histories = [ids[3:4], ids[10:17], ids[40:70], ids[5:9]]
    for batch in (histories[:1], histories):
        a = eager.recommend(batch, k=8)
        b = exported.recommend(batch, k=8)
        assert [[i for i, _ in row] for row in a] == [[i for i, _ in row] for row in b]
        for row_a, row_b in zip(a, b, strict=True):
            for (_, sa), (_, sb) in zip(row_a, row_b, strict=True):
                assert sa == pytest.approx(sb, rel=1e-4, abs=1e-5)
    seen = set(histories[1])
    assert not seen & {i for i, _ in exported.recommend([histories[1]], k=8)[0]}
    with pytest.raises(ValueError, match="k must be in"):
        exported.recommend(histories, k=9)


def test_recommender_errors_and_options(checkpoint: pathlib.Path) -> None:
    recommender = Recommender(checkpoint)
    with pytest.raises(ValueError, match=r"history 1 holds unknown item ids: \['nope'\]"):
        recommender.recommend([[recommender.item_ids[1]], ["nope"]])
    with pytest.raises(FileNotFoundError):
        Recommender(checkpoint.parent / "missing.pt")
    # exclude_seen=False ranks the history's own items like any other
    model, meta = load_model(checkpoint)
    history = recommender.item_ids[1:4]
    ids = F.pad(recommender.encode_histories([history]), (meta["max_len"], 0))[
        :, -meta["max_len"] :
    ]
    _, expected = model.recommend(ids, k=5)
    got = recommender.recommend([history], k=5, exclude_seen=False)[0]
    assert [i for i, _ in got] == [recommender.item_ids[int(i)] for i in expected[0]]


def test_serving_imports_no_training_code() -> None:
    import subprocess
    import sys

    code = (
        "import sys, convrec.serving; "
        "bad = [m for m in sys.modules if m.startswith(('convrec.training', 'convrec.data', "
        "'torch.utils.tensorboard'))]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_from_model_equals_checkpoint(checkpoint: pathlib.Path) -> None:
    model, meta = load_model(checkpoint)
    from_file = Recommender(checkpoint)
    in_memory = Recommender.from_model(model, meta["item_ids"], meta["max_len"])
    histories = [from_file.item_ids[1:6], from_file.item_ids[7:9]]
    assert in_memory.recommend(histories, k=4) == from_file.recommend(histories, k=4)
    with pytest.raises(ValueError, match="item ids for a model of"):
        Recommender.from_model(model, meta["item_ids"][:-1], meta["max_len"])
