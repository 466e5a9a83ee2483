"""Metrics against hand-computed cases; protocols on a model with known scores."""

from __future__ import annotations

import math

import pytest
import torch

from convrec import ConvRec
from convrec.baselines.popularity import Popularity
from convrec.baselines.sasrec import SASRec
from convrec.data.dataset import Event, build_dataset
from convrec.data.synthetic import synthetic_dataset
from convrec.evaluation import evaluate, format_metrics, rank_of_target, ranking_metrics
from convrec.evaluation.metrics import rank_excluding
from convrec.evaluation.protocols import PROTOCOLS


def test_ranks_count_ties_against_the_model() -> None:
    target = torch.tensor([5.0, 5.0, 5.0])
    others = torch.tensor([[1.0, 2.0, 3.0], [5.0, 1.0, 6.0], [5.0, 5.0, 5.0]])
    assert rank_of_target(target, others).tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match="NaN"):
        rank_of_target(torch.tensor([float("nan")]), torch.zeros(1, 2))


def test_metric_values_by_hand() -> None:
    result = ranking_metrics(torch.tensor([0, 3, 7]), ks=(1, 5, 10))
    assert result["HR@1"] == pytest.approx(1 / 3)
    assert result["HR@5"] == pytest.approx(2 / 3)
    assert result["HR@10"] == pytest.approx(1.0)
    assert result["NDCG@5"] == pytest.approx((1 + 1 / math.log2(5)) / 3)
    assert result["NDCG@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(9)) / 3)
    assert result["MRR"] == pytest.approx((1 + 1 / 4 + 1 / 8) / 3)


def test_k_larger_than_candidates() -> None:
    # 5 candidates in all: always a hit
    assert ranking_metrics(torch.tensor([4]), ks=(20,))["HR@20"] == 1.0
    with pytest.raises(ValueError, match="no ranks"):
        ranking_metrics(torch.tensor([], dtype=torch.long))


def test_protocols_with_popularity() -> None:
    # item 1 is the most popular; user "a" ends with 1 (test target), user "b" with 4
    events = [Event("a", i, None, k) for k, i in enumerate(["2", "3", "5", "1"])]
    events += [Event("b", i, None, k) for k, i in enumerate(["1", "2", "3", "4"])]
    events += [Event("c", i, None, k) for k, i in enumerate(["1", "2", "1", "5", "3"])]
    data = build_dataset("toy", events, {}, "toy")
    counts = torch.tensor([0.0, 10, 8, 6, 1, 4])  # popularity of items 0..5
    result = evaluate(Popularity(counts), data, "test", ("full",), max_len=3)
    # a: target 1, seen {2,3,5}: rank 0. b: target 4, seen {1,2,3}: only 5 (4 > 1) -> rank 1.
    # c: target 3, seen {1,2,5}: remaining 4 (1 < 6) -> rank 0.
    assert result["full/HR@1"] == pytest.approx(2 / 3)
    assert result["full/MRR"] == pytest.approx((1 + 0.5 + 1) / 3)
    text = format_metrics(result, data, "toy")
    assert "seen items excluded" in text and "| HR@1 |" in text


def test_sampled_protocol_uses_given_negatives() -> None:
    events = [Event("a", i, None, k) for k, i in enumerate(["1", "2", "3"])]
    events += [Event("b", i, None, k) for k, i in enumerate(["4", "5", "6"])]
    data = build_dataset("toy", events, {}, "toy")
    counts = torch.tensor([0.0, 1, 2, 3, 4, 5, 6])
    negatives = torch.tensor([[4, 5], [1, 2]]).numpy()
    result = evaluate(Popularity(counts), data, "test", ("sampled",), negatives=negatives)
    # a: target 3 vs {4, 5}: rank 2. b: target 6 vs {1, 2}: rank 0.
    assert result["sampled/HR@1"] == pytest.approx(0.5)
    assert result["sampled/MRR"] == pytest.approx((1 / 3 + 1) / 2)


@pytest.mark.parametrize("kind", ["convrec", "streaming", "sasrec", "popularity"])
def test_both_protocols_rank_as_each_alone(kind: str) -> None:
    """Evaluated together, the sampled protocol reads its candidates' columns of the all-items
    scores (one encoding per batch); its ranks equal those of scoring the candidates on their
    own, and the full protocol's are unchanged. Float64 models with random weights, so no
    ranking rests on a near tie."""
    data = synthetic_dataset(num_users=40, num_items=600, mean_length=8, max_length=20, seed=3)
    torch.manual_seed(0)
    if kind == "popularity":
        model = Popularity(torch.rand(data.num_items + 1, dtype=torch.float64))
    elif kind == "sasrec":
        model = SASRec(data.num_items, 16, max_len=10)
    else:
        model = ConvRec(data.num_items, 16, [(2, 2), (5, 5)], streaming=kind == "streaming")
    model = model.double()
    alone = {}
    for protocol in PROTOCOLS:
        alone |= evaluate(model, data, "test", (protocol,), max_len=10, batch_size=16)
    together = evaluate(model, data, "test", PROTOCOLS, max_len=10, batch_size=16)
    assert together == alone
    assert alone["sampled/MRR"] != alone["full/MRR"]  # two protocols, not one read twice


def test_rank_excluding_equals_ranking_without_those_columns() -> None:
    """Against removing the excluded columns and ranking the rest: integer scores (many ties,
    some with excluded columns), repeated ids, the target among them more than once."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (50, 40), generator=g).double()
    targets = torch.randint(0, 40, (50,), generator=g)
    excluded = torch.cat(
        [torch.randint(0, 40, (50, 12), generator=g), targets[:, None], targets[:, None]], dim=1
    )
    target_scores = scores.gather(1, targets[:, None]).squeeze(1)
    expected = []
    for row in range(50):
        keep = torch.ones(40, dtype=torch.bool)
        keep[excluded[row]] = False
        expected.append(rank_of_target(target_scores[row : row + 1], scores[row : row + 1, keep]))
    assert rank_excluding(scores, target_scores, excluded).tolist() == torch.cat(expected).tolist()
    inf = scores.clone()
    inf[0, 0], inf[0, 1] = float("inf"), float("-inf")  # a row summing to NaN holds no NaN
    assert rank_excluding(inf, target_scores, excluded)[0] >= 0
    scores[3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rank_excluding(scores, target_scores, excluded)
