"""``stream_downscale``: the anchored level stack. For every prefix of random histories (padding,
several level schedules and head counts, mask-aware on and off) the one-pass reference and the
per-event state updates equal the stack run on that prefix alone, in float64."""

from __future__ import annotations

import dataclasses
from itertools import product

import pytest
import torch

from convrec import ConvRec, ConvRecEncoder
from convrec.model import length_groups
from convrec.ops.downscale import level_mix
from convrec.ops.stream_downscale import (
    kept_rows,
    stream_downscale,
    stream_downscale_prefix,
    stream_downscale_reference,
    stream_push,
    stream_state,
)
from tests.helpers import randomise, requires_cuda_extension, requires_extension

SCHEDULES = [[(3, 3)], [(2, 2), (3, 3)], [(2, 2), (2, 2), (2, 2)]]


def _setup(levels, heads, dtype=torch.float64, length=13, batch=4):
    encoder = randomise(ConvRecEncoder(8, levels, heads=heads, dropout=0.0)).to(dtype).eval()
    params = encoder.level_params()
    strides = [s for _, s in levels]
    x = torch.randn(batch, length, 8, dtype=dtype)
    mask = torch.ones(batch, length, dtype=torch.bool)
    for row, real in enumerate((length, 1, length - 4, 0)[:batch]):
        mask[row, : length - real] = False
    return params, strides, x * mask[..., None], mask


@pytest.mark.parametrize("levels", SCHEDULES)
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("mask_aware", [False, True])
@pytest.mark.parametrize("newest_last", [False, True])
def test_every_prefix_equals_the_prefix_alone(levels, heads, mask_aware, newest_last) -> None:
    params, strides, x, mask = _setup(levels, heads)
    every = stream_downscale_reference(
        x, mask, params, strides, heads, mask_aware, newest_last=newest_last
    )
    length = x.shape[1]
    for row in range(x.shape[0]):
        real = torch.nonzero(mask[row]).flatten().tolist()
        for n in range(1, len(real) + 1):
            prefix = torch.zeros(1, length, 8, dtype=x.dtype)
            prefix[0, length - n :] = x[row, real[:n]]
            alone = stream_downscale_prefix(
                prefix, prefix.abs().sum(-1) > 0, params, strides, heads, mask_aware,
                newest_last=newest_last,
            )  # fmt: skip
            torch.testing.assert_close(every[row, real[n - 1]], alone[0], rtol=0, atol=1e-12)
        assert (every[row, ~mask[row]] == 0).all()


@pytest.mark.parametrize("heads", [1, 2])
def test_newest_last_gradients_equal_the_prefixes_alone(heads) -> None:
    """The one-pass newest-last reference's gradients (input and every level tensor) are those
    of the prefixes run alone: a loss on every position, float64."""
    params, strides, x, mask = _setup([(2, 2), (3, 3)], heads, length=9, batch=3)
    x.requires_grad_()
    leaves = [x, *(t for p in params for t in p if t.requires_grad)]
    weight = torch.randn(*x.shape, dtype=x.dtype)
    every = stream_downscale_reference(x, mask, params, strides, heads, newest_last=True)
    fast = torch.autograd.grad((every * weight * mask[..., None]).sum(), leaves)
    total = x.new_zeros(())
    for row in range(x.shape[0]):
        real = torch.nonzero(mask[row]).flatten().tolist()
        for n in range(1, len(real) + 1):
            prefix = x.new_zeros(1, *x.shape[1:])
            prefix[0, x.shape[1] - n :] = x[row, real[:n]]  # the first n events, left-padded
            keep = torch.arange(x.shape[1]) >= x.shape[1] - n
            alone = stream_downscale_prefix(
                prefix, keep[None], params, strides, heads, newest_last=True
            )
            total = total + (alone[0] * weight[row, real[n - 1]]).sum()
    slow = torch.autograd.grad(total, leaves)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("levels", SCHEDULES)
@pytest.mark.parametrize("mask_aware", [False, True])
@pytest.mark.parametrize("newest_last", [False, True])
def test_pushing_events_equals_the_one_pass_reference(levels, mask_aware, newest_last) -> None:
    """Users at different points of their histories pushed together, one event each."""
    params, strides, x, mask = _setup(levels, heads=2)
    every = stream_downscale_reference(
        x, mask, params, strides, 2, mask_aware, newest_last=newest_last
    )
    length = x.shape[1]
    starts = length - mask.sum(1)  # each row's first real slot
    kept = kept_rows(strides, newest_last)
    state = stream_state(x.shape[0], 8, len(levels), x, kept)
    for step in range(length):
        slots = (starts + step).clamp(max=length - 1)
        live = starts + step < length
        events = x[torch.arange(x.shape[0]), slots]
        user, pushed = stream_push(
            state, events, params, strides, 2, mask_aware, newest_last=newest_last
        )
        state = type(state)(*(
            _keep(new, old, live) for new, old in zip(pushed, state, strict=True)
        ))  # fmt: skip
        expected = every[torch.arange(x.shape[0]), slots]
        torch.testing.assert_close(user[live], expected[live], rtol=0, atol=1e-12)


@pytest.mark.parametrize("mask_aware", [False, True])
def test_newest_last_moves_only_open_windows(mask_aware) -> None:
    """newest_last changes the stack only where some level's window is open: a history whose
    length fills every window (12 = 2 x 3 x 2) gives the same vector, the others do not; and
    its open window equals the same items placed last in a full window of zeros before them
    (a single level, the conv term by hand)."""
    levels = [(2, 2), (3, 3), (2, 2)]
    params, strides, x, mask = _setup(levels, heads=1, length=12, batch=1)
    args = (x, mask, params, strides, 1, mask_aware)
    filled = stream_downscale_reference(*args)
    last = stream_downscale_reference(*args, newest_last=True)
    torch.testing.assert_close(last[0, -1], filled[0, -1], rtol=0, atol=1e-12)
    assert (last[0, :-1] - filled[0, :-1]).abs().amax(-1).min() > 1e-6
    single, single_strides = params[1:2], strides[1:2]  # one level of kernel 3
    two = x[:, -2:]
    one_pass = stream_downscale_reference(
        two, torch.ones(1, 2, dtype=torch.bool), single, single_strides, 1, mask_aware,
        newest_last=True,
    )  # fmt: skip
    w, b = single[0].conv_weight, single[0].conv_bias
    conv = b + w[:, :, 1] @ two[0, 0] + w[:, :, 2] @ two[0, 1]  # items at offsets 1 and 2
    pooled = two[0].sum(0) / (2 if mask_aware else 3)
    expected = level_mix(conv, pooled, pooled, single[0], None, None, 0, 1e-5)
    torch.testing.assert_close(one_pass[0, -1], expected, rtol=0, atol=1e-12)


@requires_extension
def test_newest_last_drops_what_the_reference_drops() -> None:
    """newest_last runs the reference stack on every backend; on the extension's backend only
    its dropout pass is the extension's, with the same masks."""
    params, strides, x, mask = _setup([(2, 2), (3, 3)], heads=1)
    outputs = []
    for backend in ("reference", "cpp"):
        torch.manual_seed(5)
        args = (x, mask, params, strides, 1, True, 0.3, True)
        outputs.append(stream_downscale(*args, backend=backend, newest_last=True))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-12)


def test_newest_last_needs_streaming() -> None:
    with pytest.raises(ValueError, match="newest_last lays out a streaming stack"):
        ConvRecEncoder(8, [(2, 2)], newest_last=True)


def test_newest_last_is_the_streaming_default() -> None:
    """Left unset, a streaming stack lays its open windows out newest-last (the layout that
    validation chose, ``streaming_cpu/accuracy.md``); other stacks have no open windows."""
    assert ConvRec(30, 8, [(2, 2)], streaming=True).encoder.newest_last is True
    assert ConvRecEncoder(8, [(2, 2)], streaming=True, newest_last=False).newest_last is False
    assert ConvRec(30, 8, [(2, 2)]).encoder.newest_last is False


def test_a_spec_without_newest_last_keeps_the_in_place_layout() -> None:
    """Checkpoints written when the in-place layout was the default store no newest_last (or
    None): rebuilt, they keep it; a spec that names it is followed."""
    from convrec.registry import build_model

    spec = {"kind": "convrec", "attr_offsets": None, "attr_ids": None}
    kwargs = dict(num_items=30, d_model=8, levels=[[2, 2]], streaming=True)
    assert build_model(spec | {"kwargs": kwargs}).encoder.newest_last is False
    old = kwargs | {"newest_last": None}
    assert build_model(spec | {"kwargs": old}).encoder.newest_last is False
    named = kwargs | {"newest_last": True}
    assert build_model(spec | {"kwargs": named}).encoder.newest_last is True


def _keep(new, old, live):
    """Rows that had no event left keep their state (lists hold one tensor per level)."""
    if isinstance(new, list):
        return [_keep(n, o, live) for n, o in zip(new, old, strict=True)]
    return torch.where(live.view(-1, *[1] * (new.dim() - 1)), new, old)


@pytest.mark.parametrize("newest_last", [False, True])
def test_the_state_is_a_few_kilobytes(newest_last) -> None:
    """At D = 64 in bf16, for the default levels (2, 2), (5, 5), (7, 7): 2.2 KiB, and 3.9 KiB
    with the per-shift sums that newest_last keeps."""
    kept = kept_rows([2, 5, 7], newest_last)
    state = stream_state(1, 64, 3, torch.zeros(1, dtype=torch.bfloat16), kept)
    tensors = [t for part in state for t in (part if isinstance(part, list) else [part])]
    size = sum(t.numel() * t.element_size() for t in tensors)
    assert size == 8 + (17 + sum(kept)) * 64 * 2 and size <= 8 * 1024


def test_float32_follows_float64() -> None:
    params, strides, x, mask = _setup([(2, 2), (3, 3)], heads=1)
    exact = stream_downscale_reference(x, mask, params, strides, 1, True)
    single = stream_downscale_reference(
        x.float(), mask, [type(p)(*(t.float() for t in p)) for p in params], strides, 1, True
    )
    torch.testing.assert_close(single.double(), exact, rtol=1e-4, atol=1e-5)


def test_training_draws_dropout_and_backpropagates() -> None:
    params, strides, x, mask = _setup([(2, 2), (3, 3)], heads=1, dtype=torch.float32)
    x.requires_grad_()
    out = stream_downscale_reference(x, mask, params, strides, 1, True, dropout=0.5, training=True)
    eval_out = stream_downscale_reference(x, mask, params, strides, 1, True)
    assert not torch.allclose(out, eval_out)
    out.sum().backward()
    assert x.grad[mask].abs().sum() > 0 and (x.grad[~mask] == 0).all()


def test_overlapping_windows_are_refused() -> None:
    params, strides, x, mask = _setup([(3, 2)], heads=1)
    with pytest.raises(ValueError, match="kernel == stride at every level; level 0 has kernel 3"):
        stream_downscale_reference(x, mask, params, strides, 1)


# ---- the streaming encoder and model ----


def test_streaming_model_scores_every_position_as_its_prefix(attribute_lists) -> None:
    """``score_positions`` of ConvRec(streaming=True), newest-item readouts included, gives
    each real slot the scores of ``score`` on the history cut at that slot."""
    model = ConvRec(
        30, d_model=8, levels=[(2, 2), (3, 3)], item_attributes=attribute_lists, dropout=0.0,
        mask_aware=True, readouts=["last_item_skip", "last_item_transition"], streaming=True,
    )  # fmt: skip
    model = randomise(model.double()).eval()
    ids = torch.randint(1, 31, (3, 9))
    ids[1, :4] = 0
    ids[2, :8] = 0
    every = model.score_positions(ids)
    row = 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if ids[b, t] == 0:
                continue
            prefix = torch.zeros(1, ids.shape[1], dtype=torch.long)
            prefix[0, ids.shape[1] - 1 - t :] = ids[b, : t + 1]
            torch.testing.assert_close(every[row], model.score(prefix)[0], rtol=0, atol=1e-10)
            row += 1
    assert row == every.shape[0] == int((ids != 0).sum())


@pytest.mark.parametrize("newest_last", [False, True])
def test_length_groups_give_the_one_pass_result(newest_last) -> None:
    """On the CPU, rows of very different lengths run in separate passes cut to their longest
    history (``length_groups``): the same vectors and parameter gradients as one pass over the
    whole batch (float64, training mode without dropout), an empty row staying zero."""
    model = ConvRec(
        40, d_model=8, levels=[(2, 2), (3, 3)], dropout=0.0, mask_aware=True,
        readouts=["last_item_skip"], streaming=True, newest_last=newest_last,
    )  # fmt: skip
    model = randomise(model.double()).train()
    lengths = [14, 2, 5, 9, 0, 1, 7, 13, 3]
    ids = torch.zeros(len(lengths), 14, dtype=torch.long)
    for row, length in enumerate(lengths):
        if length:
            ids[row, -length:] = torch.randint(1, 41, (length,))
    mask = ids != 0
    groups = length_groups(mask)
    assert len(groups) == 4
    rows = torch.cat([r for r, _ in groups]).sort().values
    assert rows.tolist() == [r for r, n in enumerate(lengths) if n]  # each real row once
    for group_rows, kept in groups:
        assert kept == max(lengths[r] for r in group_rows.tolist())
    grouped = model._encode_positions(ids, mask, None)
    one_pass = model._encode_window_positions(ids, mask, None)
    torch.testing.assert_close(grouped, one_pass, rtol=0, atol=1e-12)
    assert torch.equal(grouped[4], torch.zeros_like(grouped[4]))
    params = list(model.parameters())
    got = torch.autograd.grad(grouped.square().sum(), params, allow_unused=True)
    want = torch.autograd.grad(one_pass.square().sum(), params, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


def test_length_groups_stay_out_of_torch_compile() -> None:
    """Under ``torch.compile`` (``train --compile``) the step keeps one pass of static shape:
    grouping by length would break the graph, which ``fullgraph=True`` refuses."""
    model = ConvRec(40, 8, [(2, 2), (3, 3)], dropout=0.0, streaming=True, backend="reference")
    model = model.double().eval()
    ids = torch.zeros(5, 12, dtype=torch.long)
    for row, length in enumerate([12, 2, 5, 9, 1]):
        ids[row, -length:] = torch.randint(1, 41, (length,))
    mask = ids != 0
    assert len(length_groups(mask)) > 1
    compiled = torch.compile(lambda i, m: model._encode_positions(i, m, None), fullgraph=True)
    one_pass = model._encode_window_positions(ids, mask, None)
    torch.testing.assert_close(compiled(ids, mask), one_pass, rtol=0, atol=1e-12)


def test_streaming_encoder_push_equals_forward() -> None:
    encoder = randomise(ConvRecEncoder(8, [(2, 2), (2, 2)], dropout=0.0, streaming=True)).eval()
    x = torch.randn(2, 7, 8)
    every = encoder.forward_positions(x)
    state = encoder.initial_state(2, x)
    for t in range(7):
        user, state = encoder.push(state, x[:, t])
        torch.testing.assert_close(user, every[:, t], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(encoder(x), every[:, -1])
    # eval forward runs the anchored stack once per history (not every prefix): same vectors,
    # float64, left padding, mask-aware
    aware = randomise(ConvRecEncoder(8, [(2, 2), (3, 3)], streaming=True, mask_aware=True))
    aware = aware.double().eval()
    x = torch.randn(3, 9, 8, dtype=torch.float64)
    mask = torch.arange(9) >= torch.tensor([[0], [4], [8]])
    expected = aware.forward_positions(x, mask)[:, -1]
    torch.testing.assert_close(aware(x, mask), expected, rtol=1e-12, atol=1e-12)


def test_streaming_refuses_what_it_cannot_follow() -> None:
    with pytest.raises(ValueError, match="level 0 has kernel 3, stride 2"):
        ConvRecEncoder(8, [(3, 2)], streaming=True)
    with pytest.raises(ValueError, match="faithful=True is the paper's stack"):
        ConvRec(30, d_model=8, faithful=True, max_len=10, streaming=True)
    with pytest.raises(ValueError, match="readout 'attention'"):
        ConvRec(30, d_model=8, readouts=["attention"], streaming=True)
    with pytest.raises(TypeError, match="build it with streaming=True"):
        ConvRec(30, d_model=8).score_positions(torch.tensor([[1, 2, 3]]))


def test_streaming_training_runs_all_positions(tmp_path) -> None:
    from convrec.checkpoint_file import load_checkpoint
    from convrec.training import TrainConfig, train

    tiny = {"num_users": 80, "num_items": 200, "mean_length": 10, "max_length": 30, "seed": 2}
    config = TrainConfig(
        synthetic=tiny, epochs=1, d_model=8, max_len=12, levels=[[2, 2], [2, 2], [3, 3]],
        streaming=True, train_sampling="all-positions", backend="reference",
    )  # fmt: skip
    summary = train(config, tmp_path, progress=False, echo=lambda _m: None)
    assert summary["epochs_trained"] == 1 and 0 <= summary["test"]["full/NDCG@10"] <= 1
    saved = load_checkpoint(tmp_path / "best.pt")  # the default layout, stored resolved
    assert saved["config"]["newest_last"] is saved["model_spec"]["kwargs"]["newest_last"] is True
    in_place = dataclasses.replace(config, newest_last=False, backend="auto")
    summary = train(in_place, tmp_path / "in_place", progress=False, echo=lambda _m: None)
    assert summary["epochs_trained"] == 1 and 0 <= summary["test"]["full/NDCG@10"] <= 1


# ---- serving from states ----


def _streaming_model(attribute_lists, newest_last: bool = False) -> ConvRec:
    model = ConvRec(
        30, d_model=8, levels=[(2, 2), (3, 3)], item_attributes=attribute_lists, dropout=0.0,
        mask_aware=True, readouts=["last_item_skip", "last_item_table"], streaming=True,
        newest_last=newest_last,
    )  # fmt: skip
    return randomise(model).eval()


@pytest.mark.parametrize("newest_last", [False, True])
def test_a_pool_of_states_serves_interleaved_users(attribute_lists, newest_last) -> None:
    """Users pushed in any interleaving get the model's scores on their histories so far."""
    from convrec.serving import StreamingRecommender

    model = _streaming_model(attribute_lists, newest_last)
    server = StreamingRecommender(model, num_users=5, k=4)
    histories: dict[int, list[int]] = {u: [] for u in range(5)}
    gen = torch.Generator().manual_seed(3)
    for _ in range(12):
        users = torch.randperm(5, generator=gen)[: int(torch.randint(1, 4, (1,), generator=gen))]
        items = torch.randint(1, 31, (len(users),), generator=gen)
        scores, top = server.push(users, items)
        for row, (user, item) in enumerate(zip(users.tolist(), items.tolist(), strict=True)):
            histories[user].append(item)
            expected = model.score(torch.tensor([histories[user]]))
            want_scores, want_items = expected.topk(4)
            torch.testing.assert_close(scores[row], want_scores[0], rtol=1e-5, atol=1e-5)
            assert torch.equal(top[row], want_items[0])
    server.reset(torch.tensor([0]))
    assert server.events[0] == 0 and (server.states[0] == 0).all()
    with pytest.raises(ValueError, match="at most once per call"):
        server.push(torch.tensor([1, 1]), torch.tensor([2, 3]))


@pytest.mark.parametrize("newest_last", [False, True])
def test_the_streaming_module_exports(attribute_lists, newest_last) -> None:
    from convrec.ops.stream_downscale import pack_state
    from convrec.serving import StreamingModule

    module = StreamingModule(_streaming_model(attribute_lists, newest_last), k=3)
    state = module.model.encoder.initial_state(4, module.table)
    events, packed = pack_state(state._replace(events=torch.tensor([0, 1, 5, 17])))
    packed = torch.randn_like(packed)
    items = torch.tensor([3, 7, 1, 30])
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(
        module, (events, packed, items), dynamic_shapes=({0: batch}, {0: batch}, {0: batch})
    )
    exported, eager = program.module()(events, packed, items), module(events, packed, items)
    for got, want in zip(exported, eager, strict=True):
        torch.testing.assert_close(got, want)


def test_a_streaming_checkpoint_serves_original_ids(tmp_path) -> None:
    from convrec.checkpoint_file import load_checkpoint
    from convrec.serving import StreamingRecommender
    from convrec.training import TrainConfig, train

    tiny = {"num_users": 80, "num_items": 200, "mean_length": 10, "max_length": 30, "seed": 2}
    config = TrainConfig(
        synthetic=tiny, epochs=1, d_model=8, max_len=12, levels=[[2, 2], [3, 3]],
        streaming=True, train_sampling="all-positions", backend="reference",
    )  # fmt: skip
    train(config, tmp_path, progress=False, echo=lambda _m: None)
    item_ids = load_checkpoint(tmp_path / "best.pt")["item_ids"]
    server = StreamingRecommender.from_checkpoint(str(tmp_path / "best.pt"), num_users=2, k=3)
    first = server.observe([("ann", item_ids[5]), ("bob", item_ids[7])])
    second = server.observe([("ann", item_ids[9])])
    assert set(first) == {"ann", "bob"}
    model = server.module.model
    want_scores, want_items = model.score(torch.tensor([[5, 9]])).topk(3)
    assert [item for item, _ in second["ann"]] == [item_ids[i] for i in want_items[0].tolist()]
    got = torch.tensor([score for _, score in second["ann"]])
    torch.testing.assert_close(got, want_scores[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="the pool holds 2 users"):
        server.observe([("cid", item_ids[1])])
    with pytest.raises(ValueError, match="unknown item ids"):
        server.observe([("ann", "no-such-item")])


# ---- the convrec._C op (backend "cpp"; "cuda" runs the same code) ----


def _both_backends(levels, heads, mask_aware, dtype=torch.float64, length=13, **kwargs):
    """Values, x gradient and packed-parameter gradient of ``stream_downscale`` on the
    reference and the extension, same inputs, same torch seed (the same dropout masks)."""
    torch.manual_seed(0)
    encoder = randomise(ConvRecEncoder(8, levels, heads=heads, dropout=0.0)).to(dtype)
    _, strides, x, mask = _setup(levels, heads, dtype, length)
    grad = torch.randn(x.shape, dtype=dtype)
    results = []
    for backend in ("reference", "cpp"):
        torch.manual_seed(1)
        leaf = x.clone().requires_grad_()
        encoder.stack_weights.grad = None
        args = (leaf, mask, encoder.packed(), strides, heads, mask_aware)
        out = stream_downscale(*args, backend=backend, **kwargs)
        (out * grad).sum().backward()
        results.append((out.detach(), leaf.grad, encoder.stack_weights.grad.clone()))
    return results


@requires_extension
@pytest.mark.parametrize("levels", [*SCHEDULES, [(4, 4), (2, 2)], [(1, 1), (5, 5)]])
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("mask_aware", [False, True])
@pytest.mark.parametrize("length", [13, 40])
@pytest.mark.parametrize("newest_last", [False, True])
def test_extension_equals_reference(levels, heads, mask_aware, length, newest_last) -> None:
    """float64: every position's vector and both gradients, padding included, with windows
    cut by the history's end (13) and histories many times the stack's span (40), in both
    open-window layouts."""
    reference, fast = _both_backends(
        levels, heads, mask_aware, length=length, newest_last=newest_last
    )
    for want, got in zip(reference, fast, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


@requires_extension
@pytest.mark.parametrize("mask_aware", [False, True])
@pytest.mark.parametrize("newest_last", [False, True])
def test_extension_drops_what_the_reference_drops(mask_aware, newest_last) -> None:
    kwargs = {"dropout": 0.4, "training": True, "newest_last": newest_last}
    reference, fast = _both_backends([(2, 2), (3, 3)], 2, mask_aware, **kwargs)
    eval_out = _both_backends([(2, 2), (3, 3)], 2, mask_aware, newest_last=newest_last)[1][0]
    assert not torch.allclose(fast[0], eval_out)  # dropout happened
    for want, got in zip(reference, fast, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


@requires_extension
@pytest.mark.parametrize("newest_last", [False, True])
def test_extension_float32_follows_float64(newest_last) -> None:
    """float32 errors against the float64 reference within twice the float32 reference's."""
    both = ([(2, 2), (3, 3)], 2, True)
    exact = _both_backends(*both, length=40, newest_last=newest_last)[0]
    single_ref, single_fast = _both_backends(*both, torch.float32, 40, newest_last=newest_last)
    for want, ref, got in zip(exact, single_ref, single_fast, strict=True):
        bound = 2 * (ref.double() - want).abs().max() + 4e-6 * (1 + want.abs().max())
        assert (got.double() - want).abs().max() <= bound


@requires_extension
def test_extension_opcheck() -> None:
    encoder = randomise(ConvRecEncoder(8, [(2, 2), (3, 3)], heads=2, dropout=0.0)).double()
    x = torch.randn(3, 11, 8, dtype=torch.float64)
    seed = torch.tensor([7, 9])
    for dropout_args in ((None, 0.0), (seed, 0.3)):
        for newest_last in (False, True):
            args = (x, encoder.stack_weights.detach(), [2, 3], 2, True, *dropout_args, 1e-5)
            op = torch.ops.convrec.stream_downscale.default
            torch.library.opcheck(op, (*args, newest_last))


@requires_extension
def test_extension_errors_name_the_op() -> None:
    x = torch.randn(2, 5, 8)
    with pytest.raises(RuntimeError, match=r"stream_downscale: params must have shape \("):
        torch.ops.convrec.stream_downscale(x, torch.zeros(3), [2], 1, False, None, 0.0, 1e-5, False)


@requires_extension
def test_streaming_encoder_dispatches_the_same_ops_whatever_the_levels() -> None:
    """A streaming forward + backward on "cpp" is one op each way plus the alignment: the
    same op count for one level and for four."""
    from tests.test_dispatch_count import CountOps

    counts = []
    for levels, newest_last in product(([(2, 2)], [(2, 2), (3, 3), (2, 2), (2, 2)]), [0, 1]):
        encoder = ConvRecEncoder(
            8, levels, dropout=0.1, streaming=True, backend="cpp", newest_last=bool(newest_last)
        ).train()
        x = torch.randn(3, 20, 8, requires_grad=True)
        mask = torch.arange(20) >= torch.tensor([[0], [5], [19]])
        with CountOps() as counted:
            encoder.forward_positions(x, mask).sum().backward()
        assert counted.ops.count("convrec.stream_downscale.default") == 1
        assert counted.ops.count("convrec.stream_downscale_backward.default") == 1
        counts.append(len(counted.ops))
    assert len(set(counts)) == 1 and counts[0] <= 45


@requires_cuda_extension
@pytest.mark.parametrize("mask_aware", [False, True])
@pytest.mark.parametrize("newest_last", [False, True])
def test_cuda_equals_reference(mask_aware, newest_last) -> None:
    """float64 on the GPU against the float64 reference on the CPU: values, x and parameter
    gradients; then training with dropout, where the CUDA op and the reference on CUDA
    tensors draw the same seed."""
    levels, heads = [(2, 2), (3, 3), (4, 4)], 2
    encoder = randomise(ConvRecEncoder(8, levels, heads=heads, dropout=0.0)).double()
    _, strides, x, mask = _setup(levels, heads, length=57)
    grad = torch.randn(x.shape, dtype=x.dtype)
    results = []
    for device, backend in (("cpu", "reference"), ("cuda", "cuda")):
        leaf = x.to(device).requires_grad_()
        packed = encoder.to(device).packed()
        encoder.stack_weights.grad = None
        out = stream_downscale(leaf, mask.to(device), packed, strides, heads, mask_aware,
                               backend=backend, newest_last=newest_last)  # fmt: skip
        (out * grad.to(device)).sum().backward()
        results.append([t.cpu() for t in (out.detach(), leaf.grad, encoder.stack_weights.grad)])
    for want, got in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    trained = []
    for backend in ("reference", "cuda"):
        torch.manual_seed(4)
        args = (x.cuda(), mask.cuda(), encoder.packed(), strides, heads, mask_aware, 0.3, True)
        trained.append(stream_downscale(*args, backend=backend, newest_last=newest_last))
    torch.testing.assert_close(trained[1], trained[0], rtol=0, atol=1e-10)


@requires_cuda_extension
def test_cuda_autocast_runs_in_bf16() -> None:
    encoder = ConvRecEncoder(64, [(2, 2), (5, 5)], streaming=True, backend="cuda").cuda()
    x = torch.randn(4, 30, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = encoder.forward_positions(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert encoder.stack_weights.grad.dtype == torch.float32
    exact = encoder.double().forward_positions(x.detach().double())
    assert (out.double() - exact).abs().max() < 0.1 * (1 + exact.abs().max())
