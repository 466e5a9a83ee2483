"""``ConvRec(faithful=True)`` against the authors' model, written here in plain tensor ops.

The oracle below uses nothing of convrec's modules or ops: it is the authors' forward
(github ismll-research/ConvRec, ``models/convrec.py``, ``models/encoders/convencoder.py``,
``models/layers/transformer.py``) on a state_dict with their key names, in float64 with dropout
off, loaded through ``convrec.compat.from_official``.
"""

from __future__ import annotations

import datetime
import math

import numpy as np
import pytest
import torch

from convrec.compat import date_features, from_official
from convrec.data.dataset import SequenceDataset
from convrec.data.splits import SequenceIndex
from convrec.evaluation.protocols import evaluate
from convrec.item_encoder import LegacyFaithfulItemEncoder
from convrec.model import ConvRec
from convrec.ops.dispatch import extension_status
from convrec.registry import build_model
from convrec.training.losses import sampled_softmax_loss
from tests.helpers import randomise

D, N, A, USERS = 8, 40, 11, 5
F64 = torch.float64


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _norm(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(-1, keepdim=True)
    std = (centred.pow(2).sum(-1, keepdim=True) / (x.shape[-1] - 1)).sqrt()
    return alpha * centred / (std + 1e-6) + beta


def _attributes(gen: torch.Generator) -> list[list[int]]:
    lists = [[]]
    for _ in range(N):
        count = int(torch.randint(0, 4, (), generator=gen))
        lists.append(sorted({int(a) for a in torch.randint(0, A, (count,), generator=gen)}))
    return lists


def _official_state(levels, heads, multi_hot, gen) -> dict[str, torch.Tensor]:
    """Random weights under the authors' names; noise everywhere (no identity norms, no 0.5s)."""

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=F64) * 0.4

    state = {
        "item_encoder.ifeature_cache.weight": multi_hot,
        "item_encoder.token_embedding.weight": r(N + 1, D),
        "item_encoder.user_embedding.weight": r(USERS + 1, 20),
        "item_encoder.features_encoder.weight": r(4 * D, A),
        "item_encoder.features_encoder.bias": r(4 * D),
        "item_encoder.features_encoder_out.weight": r(D, 4 * D),
        "item_encoder.features_encoder_out.bias": r(D),
        "item_encoder.cxt_encoder.weight": r(D, 6),
        "item_encoder.cxt_encoder.bias": r(D),
        "item_encoder.ac_encoder.weight": r(4 * D, 5 * D),
        "item_encoder.ac_encoder.bias": r(4 * D),
        "item_encoder.item_encoder.weight": r(D, 5 * D),
        "item_encoder.item_encoder.bias": r(D),
        "item_layernorm.alpha": 1 + r(D + 3),
        "item_layernorm.beta": r(D + 3),
        "in_lin.weight": r(D, D + 3),
        "in_lin.bias": r(D),
        "cxt_layer.weight": r(D, 20),
        "cxt_layer.bias": r(D),
        "time_linear.weight": r(1, D),
        "time_linear.bias": r(1),
    }
    stack = "stacked_multihead_conv."
    for level, (kernel, _) in enumerate(levels):
        for h in range(heads):
            state[f"{stack}conv_layers.{level}.convs.{h}.weight"] = r(
                D // heads, D // heads, kernel
            )
            state[f"{stack}conv_layers.{level}.convs.{h}.bias"] = r(D // heads)
        state[f"{stack}conv_layers.{level}.out_linear.weight"] = r(D, D)
        state[f"{stack}conv_layers.{level}.out_linear.bias"] = r(D)
        state[f"{stack}Res_weights1.{level}"] = 0.5 + r()
        state[f"{stack}Res_weights2.{level}"] = 0.5 + r()
        for norm in ("layer_norms", "layer_norms_out"):
            state[f"{stack}{norm}.{level}.alpha"] = 1 + r(D)
            state[f"{stack}{norm}.{level}.beta"] = r(D)
    return state


def _official_forward(s, levels, heads, ids, contexts, candidates, candidate_contexts, dated):
    """The authors' ``ConvRec.forward`` (eval): ids (B, max_len) left-padded, contexts
    (B, max_len, 6) zero at padding, candidates (B, C), candidate_contexts (B, C, 6).
    ``dated=False`` is the leak-free protocol instead: candidates get zero context and zero
    time difference. Returns (user (B, D), scores (B, C))."""

    def linear(x, name):
        return x @ s[name + ".weight"].T + s[name + ".bias"]

    def items(tokens, ctx):
        features = linear(
            s["item_encoder.ifeature_cache.weight"][tokens], "item_encoder.features_encoder"
        )
        fused = torch.cat([features, linear(ctx, "item_encoder.cxt_encoder")], -1)
        fused = linear(fused, "item_encoder.ac_encoder")
        token = s["item_encoder.token_embedding.weight"][tokens]
        return linear(torch.cat([token, fused], -1), "item_encoder.item_encoder")

    def block(v, diff):
        v = _norm(
            _gelu(torch.cat([v, diff], -1)), s["item_layernorm.alpha"], s["item_layernorm.beta"]
        )
        return _gelu(linear(v, "in_lin"))

    dates = contexts[..., :3]
    diff = torch.cat([torch.ones_like(dates[:, :1]), dates[:, 1:] - dates[:, :-1]], 1)
    x = block(items(ids, contexts), diff) * (ids > 0)[..., None]
    residual, length = x, x.shape[1]
    stack = "stacked_multihead_conv."
    for level, (k, st) in enumerate(levels):
        pad = k - length if length < k else (-(length - k)) % st
        xp = torch.cat([x.new_zeros(x.shape[0], pad, D), x], 1)
        rp = torch.cat([x.new_zeros(x.shape[0], pad, D), residual], 1)
        windows = xp.unfold(1, k, st)  # (B, L_out, D, k)
        hd = D // heads
        outs = []
        for h in range(heads):
            w = s[f"{stack}conv_layers.{level}.convs.{h}.weight"]
            b = s[f"{stack}conv_layers.{level}.convs.{h}.bias"]
            outs.append(torch.einsum("bnck,ock->bno", windows[:, :, h * hd : (h + 1) * hd], w) + b)
        y = _gelu(linear(torch.cat(outs, -1), f"{stack}conv_layers.{level}.out_linear"))
        pooled, residual = windows.mean(-1), rp.unfold(1, k, st).mean(-1)
        mixed = y + s[f"{stack}Res_weights1.{level}"] * pooled
        mixed = mixed + s[f"{stack}Res_weights2.{level}"] * residual
        norm = f"{stack}layer_norms.{level}."
        x = _norm(mixed, s[norm + "alpha"], s[norm + "beta"])
        length = x.shape[1]
    user = x.mean(1)
    target_diff = candidate_contexts[..., :3] - contexts[:, -1:, :3]
    if not dated:
        target_diff = torch.zeros_like(target_diff)
    vectors = block(items(candidates, candidate_contexts), target_diff)
    return user, torch.einsum("bd,bcd->bc", user, vectors)


def _calendar(seconds: int) -> list[float]:
    day = datetime.datetime.fromtimestamp(seconds, datetime.UTC).date()
    return [
        (day.year - 2002) / 12,
        day.month / 12,
        day.day / 31,
        day.weekday() / 7,
        day.timetuple().tm_yday / 365,
        day.isocalendar()[1] / 4,
    ]


def test_date_features_are_the_calendar() -> None:
    stamps = torch.tensor([0, 86399, 1104537600, 1230768000, 1262217600, 1798878536, 1400000000])
    same_days = torch.arange(60) * 20_000 + 1_300_000_000  # runs of equal days, in order
    stamps = torch.cat([stamps, torch.randint(-(10**9), 4 * 10**9, (300,)), same_days])
    expected = torch.tensor([_calendar(int(t)) for t in stamps], dtype=F64)
    torch.testing.assert_close(date_features(stamps), expected, rtol=0, atol=1e-15)


CASES = [  # levels, heads, max_len
    ([(2, 2), (5, 5), (7, 7)], 1, 50),
    ([(3, 2), (4, 4)], 2, 20),
    ([(8, 8)], 4, 5),
    ([(2, 2), (3, 3)], 8, 6),
]


@pytest.mark.parametrize("levels, heads, max_len", CASES)
@pytest.mark.parametrize("dates", ["none", "real", "real-leak"])
def test_faithful_reproduces_official_model(levels, heads, max_len, dates) -> None:
    gen = torch.Generator().manual_seed(len(levels) * 10 + heads)
    attributes = _attributes(gen)
    multi_hot = torch.zeros(N + 1, A, dtype=F64)
    for item, attrs in enumerate(attributes):
        multi_hot[item, attrs] = 1.0
    state = _official_state(levels, heads, multi_hot, gen)
    batch, count = 4, 7
    lengths = [max_len, max(1, max_len // 2), 1, max(1, max_len - 1)]
    ids = torch.zeros(batch, max_len, dtype=torch.long)
    stamps = torch.randint(0, 10**9, (batch, max_len), generator=gen)  # junk at padding
    targets = torch.zeros(batch, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, max_len - n :] = torch.randint(1, N + 1, (n,), generator=gen)
        days = torch.randint(0, 400, (n + 1,), generator=gen).cumsum(0) + 12_000
        stamps[b, max_len - n :] = days[:n] * 86400 + 3600
        targets[b] = days[n] * 86400
    candidates = torch.randint(1, N + 1, (batch, count), generator=gen)
    real = ids > 0
    contexts = torch.zeros(batch, max_len, 6, dtype=F64)
    candidate_contexts = torch.zeros(batch, count, 6, dtype=F64)
    if dates != "none":
        contexts[real] = torch.tensor([_calendar(int(t)) for t in stamps[real]], dtype=F64)
    if dates == "real-leak":
        target_dates = torch.tensor([_calendar(int(t)) for t in targets], dtype=F64)
        candidate_contexts[:] = target_dates[:, None, :]
    user, scores = _official_forward(
        state, levels, heads, ids, contexts, candidates, candidate_contexts, dates != "real"
    )

    model = from_official(
        state,
        attributes,
        max_len=max_len,
        levels=levels,
        heads=heads,
        use_time=dates != "none",
        leak_target_date=dates == "real-leak",
    )
    times = stamps if dates != "none" else None
    leak = dict(target_timestamps=targets) if dates == "real-leak" else {}
    exact = dict(rtol=0, atol=1e-10)
    torch.testing.assert_close(model.encode(ids, times), user, **exact)
    ours = model.score(ids, candidates, times, **leak)
    torch.testing.assert_close(ours, scores, **exact)
    # training mode with the per-position dropout path (dropout made the identity) agrees too
    model.train()
    model.encoder.dropout = 0.0
    model.item_encoder.dropout = 0.5  # takes the per-position path ...
    model.item_encoder._draw_dropout = lambda active=True: None  # ... whose dropouts keep all
    torch.testing.assert_close(model.score(ids, candidates, times, **leak), scores, **exact)
    model.eval()
    # a history shorter than max_len is the same history padded by the model
    cut = ids[1:2, max_len - lengths[1] :]
    short = model.encode(cut, times[1:2, max_len - lengths[1] :] if times is not None else None)
    torch.testing.assert_close(short, user[1:2], **exact)


def test_from_official_names_the_first_bad_tensor() -> None:
    gen = torch.Generator().manual_seed(0)
    attributes = _attributes(gen)
    multi_hot = torch.zeros(N + 1, A, dtype=F64)
    for item, attrs in enumerate(attributes):
        multi_hot[item, attrs] = 1.0
    state = _official_state([(2, 2)], 1, multi_hot, gen)
    kwargs = dict(max_len=4, levels=[(2, 2)], heads=1, use_time=False)
    assert not from_official(state, attributes, **kwargs).training
    narrow = dict(state, **{"in_lin.weight": state["in_lin.weight"][:, :-1]})
    with pytest.raises(ValueError, match=r"'in_lin\.weight' has shape"):
        from_official(narrow, attributes, **kwargs)
    with pytest.raises(ValueError, match=r"'surprise\.weight'"):
        from_official(dict(state, **{"surprise.weight": torch.zeros(1)}), attributes, **kwargs)
    with pytest.raises(ValueError, match=r"lacks 'stacked_multihead_conv.conv_layers.0.convs.1"):
        from_official(state, attributes, **dict(kwargs, heads=2))
    with pytest.raises(ValueError, match="not the multi-hot matrix"):
        from_official(state, [[], *attributes[2:], [0]], **kwargs)


def test_faithful_backends_specs_and_the_leak_option() -> None:
    model = ConvRec(30, d_model=8, faithful=True, max_len=10, use_time=True).double()
    built = extension_status() is None
    assert model.encoder.backend_for(torch.device("cpu")) == ("cpp" if built else "reference")
    with pytest.raises(ValueError, match=r"faithful input block|paper.s LayerNorm"):
        model.set_backend("triton")
    ids = torch.randint(1, 31, (2, 10))
    times = torch.arange(10).repeat(2, 1) * 86400 + 1_300_000_000
    if built:  # the extension's paper LayerNorm gives the reference's scores
        randomise(model).eval()
        fast = model.score(ids, ids[:, :3], times)
        slow = model.set_backend("reference").score(ids, ids[:, :3], times)
        torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="leak_target_date"):
        model.score(ids, ids[:, :3], times, target_timestamps=times[:, -1])
    with pytest.raises(ValueError, match="set use_time"):
        ConvRec(30, d_model=8, faithful=True, max_len=10, leak_target_date=True)
    leak = ConvRec(30, d_model=8, faithful=True, max_len=10, use_time=True, leak_target_date=True)
    with pytest.raises(ValueError, match="target_timestamps"):
        leak.score(ids, ids[:, :3], times)
    assert leak.score(ids, ids[:, :3], times, target_timestamps=times[:, -1]).shape == (2, 3)
    spec = {"kind": "convrec", "attr_offsets": None, "attr_ids": None}
    old = build_model(dict(spec, kwargs=dict(num_items=30, d_model=8, faithful=True, max_len=10)))
    assert isinstance(old.item_encoder, LegacyFaithfulItemEncoder)
    assert not old.encoder.paper_norm
    new = dict(num_items=30, d_model=8, faithful=True, max_len=10, faithful_version=2)
    assert build_model(dict(spec, kwargs=new)).encoder.paper_norm


def test_leaking_protocol_trains_and_evaluates_sampled_only() -> None:
    rng = np.random.default_rng(0)
    sequences = [rng.integers(1, 201, size=int(n)) for n in rng.integers(4, 12, size=20)]
    times = [np.sort(rng.integers(10**9, 2 * 10**9, size=len(s))) for s in sequences]
    data = SequenceDataset(
        "tiny",
        sequences,
        times,
        [str(u) for u in range(20)],
        [str(i) for i in range(201)],
        np.zeros(202, dtype=np.int64),
        np.zeros(0, dtype=np.int64),
        [],
    )
    index = SequenceIndex.from_dataset(data)
    users, cuts = np.arange(20), index.split_cuts("test")
    assert (index.target_times(users, cuts) == np.array([t[-1] for t in times])).all()
    model = ConvRec(200, d_model=8, faithful=True, max_len=10, use_time=True, leak_target_date=True)
    ids, stamps = (torch.from_numpy(a) for a in index.histories(users, cuts, 10))
    targets = torch.from_numpy(index.targets(users, cuts))
    loss = sampled_softmax_loss(
        model,
        ids,
        targets,
        stamps,
        5,
        30,
        torch.Generator().manual_seed(0),
        target_timestamps=torch.from_numpy(index.target_times(users, cuts)),
    )
    loss.backward()
    metrics = evaluate(model, data, "test", ("sampled",), max_len=10, index=index)
    assert 0 <= metrics["sampled/NDCG@10"] <= 1
    with pytest.raises(ValueError, match="'sampled' protocol only"):
        evaluate(model, data, "test", ("full",), max_len=10, index=index)


def test_serving_refuses_the_faithful_model() -> None:
    from convrec.serving.module import ServingModule

    with pytest.raises(ValueError, match="faithful=True"):
        ServingModule(ConvRec(30, d_model=8, faithful=True, max_len=10), max_len=10, k=5)


def test_the_leaking_protocol_is_configured_explicitly() -> None:
    from convrec.training import TrainConfig
    from convrec.training.config import ConfigError

    settings = dict(model="convrec", faithful=True, use_time=True, leak_target_date=True)
    settings |= dict(loss="sampled", select="sampled/NDCG@10")
    with pytest.raises(ConfigError, match="pass protocols=\\['sampled'\\]"):
        TrainConfig(**settings).check()
    assert TrainConfig(**settings, protocols=["sampled"]).check().protocols == ["sampled"]
    with pytest.raises(ConfigError, match="needs faithful, use_time and loss='sampled'"):
        TrainConfig(leak_target_date=True, loss="sampled", protocols=["sampled"]).check()
