"""Checkpoints written before the readout registry still load and score as they did.

``fixtures/convrec_v0_readouts.pt`` is a ``best.pt`` that convrec train wrote (tiny synthetic
data, d_model 8, all five readouts as the boolean settings of that version, one epoch) at
commit d835b40, before readouts became a registry; ``convrec_v0_readouts_scores.pt`` holds the
all-item scores that model gave four fixed histories then.
"""

from __future__ import annotations

import json
import pathlib

import torch

from convrec.checkpoint_file import load_checkpoint
from convrec.cli import main
from convrec.readouts import LEGACY_FLAGS, READOUTS
from convrec.registry import build_model
from convrec.serving import Recommender
from convrec.training import TrainConfig

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
CHECKPOINT = FIXTURES / "convrec_v0_readouts.pt"


def test_the_fixture_is_in_the_old_format() -> None:
    """Guards the test below: the old flags and names are really there, and trained."""
    payload = load_checkpoint(CHECKPOINT)
    assert all(payload["model_spec"]["kwargs"][flag] for flag in LEGACY_FLAGS)
    assert all(payload["config"][flag] for flag in LEGACY_FLAGS)
    state = payload["model"]
    assert float(state["last_item_gate"].abs().sum()) > 0
    assert float(state["attention_readout.out.weight"].abs().sum()) > 0


def test_an_old_checkpoint_scores_as_before() -> None:
    payload = load_checkpoint(CHECKPOINT)
    model = build_model(payload["model_spec"])
    assert list(model.readouts) == list(READOUTS)
    model.load_state_dict(payload["model"])  # strict: every old key must find its new name
    saved = torch.load(FIXTURES / "convrec_v0_readouts_scores.pt", weights_only=True)
    with torch.no_grad():
        scores = model.eval().score(saved["histories"])
    torch.testing.assert_close(scores, saved["scores"])


def test_an_old_run_configuration_reads_as_readouts() -> None:
    config = TrainConfig.from_dict(load_checkpoint(CHECKPOINT)["config"]).check()
    assert config.readouts == list(READOUTS)


def test_an_old_checkpoint_serves_and_evaluates(capsys) -> None:
    top = Recommender(CHECKPOINT).recommend([["3", "17", "5"]], k=5)
    assert len(top[0]) == 5
    main(["evaluate", "--checkpoint", str(CHECKPOINT), "--json"])
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["full/NDCG@10"] <= 1
