"""The two evaluation protocols of the field, run in batches with bounded memory.

- "full": the target ranked against every item, the user's already-seen items excluded
  (the S3-Rec / FMLP-Rec / BSARec convention).
- "sampled": the target ranked against 99 negatives never seen by the user (the S3-Rec paper
  protocol), drawn uniformly with a fixed seed or read from the dataset's ``Name_sample.txt``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from convrec.data.dataset import SequenceDataset
from convrec.data.splits import SequenceIndex, sampled_negatives
from convrec.evaluation.metrics import rank_excluding, rank_of_target, ranking_metrics

PROTOCOLS = ("full", "sampled")
NEGATIVES_SEED = 12345


def describe_protocol(protocol: str, data: SequenceDataset, negatives: int = 99) -> str:
    if protocol == "full":
        return f"full ranking over all {data.num_items} items, the user's seen items excluded"
    source = (
        "from the dataset's sample file"
        if data.sample_negatives is not None
        else f"uniform over unseen items, seed {NEGATIVES_SEED}"
    )
    return f"target vs {negatives} sampled negatives ({source})"


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: SequenceDataset,
    split: str = "test",
    protocols: tuple[str, ...] = PROTOCOLS,
    max_len: int = 50,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    index: SequenceIndex | None = None,
    negatives: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics keyed ``"<protocol>/<metric>"`` (e.g. ``"full/NDCG@10"``) on the ``split`` targets.

    ``model`` needs ``score(item_ids, candidates=None, timestamps=None)`` (all ConvRec models,
    baselines and ``Popularity``), whose candidate scores are its all-items scores at those
    columns: with both protocols each batch is scored once, over all items. Histories hold the
    last ``max_len`` items before the target.
    Under ``torch.distributed`` each process scores every world-size-th batch of the same
    batching and the ranks are gathered, so every process returns exactly the metrics of a
    single-process evaluation.
    """
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
    if "full" in protocols and _leaks_target_date(model):
        raise ValueError(
            "this model gives candidates the target's date (leak_target_date): evaluate it under "
            "the 'sampled' protocol only"
        )
    index = index or SequenceIndex.from_dataset(data)
    if "sampled" in protocols and negatives is None:
        negatives = sampled_negatives(data, seed=NEGATIVES_SEED)
    rank, world = _shard()
    was_training = model.training
    model.eval()
    cuts_all = index.split_cuts(split)
    found: dict[int, dict[str, Tensor]] = {}
    for number, start in enumerate(range(0, data.num_users, batch_size)):
        if number % world != rank:
            continue
        users = np.arange(start, min(start + batch_size, data.num_users))
        found[number] = {
            p: r.cpu()
            for p, r in _batch_ranks(
                model, index, negatives, users, cuts_all[users], protocols, max_len, device
            ).items()
        }
    model.train(was_training)
    if world > 1:
        shards: list[dict] = [{} for _ in range(world)]
        torch.distributed.all_gather_object(shards, found)
        found = {k: v for shard in shards for k, v in shard.items()}
    return {
        f"{p}/{name}": value
        for p in protocols
        for name, value in ranking_metrics(torch.cat([found[b][p] for b in sorted(found)])).items()
    }


def _shard() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _batch_ranks(
    model: nn.Module,
    index: SequenceIndex,
    negatives: np.ndarray | None,
    users: np.ndarray,
    cuts: np.ndarray,
    protocols: tuple[str, ...],
    max_len: int,
    device: str | torch.device,
    history_cuts: np.ndarray | None = None,
) -> dict[str, Tensor]:
    """Ranks of the targets at ``cuts``, each scored from the items before its cut, or before
    ``history_cuts`` when given (a diagnostic: how much the newest items count).

    With both protocols the histories are encoded once: the sampled candidates' scores are
    their columns of the all-items scores (the same dot products; a model that gives
    candidates the target's date is scored under the sampled protocol alone)."""
    ids, times = index.histories(users, cuts if history_cuts is None else history_cuts, max_len)
    ids_t = torch.from_numpy(ids).to(device)
    times_t = torch.from_numpy(times).to(device) if _uses_time(model) else None
    targets = torch.from_numpy(index.targets(users, cuts)).to(device)
    ranks = {}
    all_items = None
    if "full" in protocols:
        all_items = model.score(ids_t, timestamps=times_t)
        target_scores = all_items.gather(1, targets[:, None]).squeeze(1)
        seen = torch.from_numpy(index.seen(users, cuts)).to(device)
        padding = torch.zeros_like(targets)[:, None]  # column 0 ranks nothing either
        excluded = torch.cat([seen, targets[:, None], padding], dim=1)  # not its own rival
        ranks["full"] = rank_excluding(all_items, target_scores, excluded)
    if "sampled" in protocols:
        negs = torch.from_numpy(negatives[users]).to(device)
        candidates = torch.cat([targets[:, None], negs], dim=1)
        if all_items is not None:
            scores = all_items.gather(1, candidates)
        else:
            extra = {}
            if _leaks_target_date(model):
                times = index.target_times(users, cuts)
                extra["target_timestamps"] = torch.from_numpy(times).to(device)
            scores = model.score(ids_t, candidates, timestamps=times_t, **extra)
        ranks["sampled"] = rank_of_target(scores[:, 0], scores[:, 1:])
    return ranks


def _leaks_target_date(model: nn.Module) -> bool:
    return bool(getattr(model, "leaks_target_date", False))


def _uses_time(model: nn.Module) -> bool:
    encoder = getattr(model, "item_encoder", None)
    return bool(getattr(encoder, "use_time", False))


def format_metrics(metrics: dict[str, float], data: SequenceDataset, title: str = "") -> str:
    """A Markdown table per protocol present in ``metrics``, each labelled with its protocol."""
    lines = [title] if title else []
    for protocol in PROTOCOLS:
        names = [k.split("/", 1)[1] for k in metrics if k.startswith(protocol + "/")]
        if not names:
            continue
        lines += [
            f"{protocol}: {describe_protocol(protocol, data)}",
            "| " + " | ".join(names) + " |",
            "|" + "---|" * len(names),
            "| " + " | ".join(f"{metrics[f'{protocol}/{n}']:.4f}" for n in names) + " |",
            "",
        ]
    return "\n".join(lines).rstrip()
