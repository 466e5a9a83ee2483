"""all_items_cross_entropy (convrec/ops/all_items.py): the chunked full-softmax loss against
its reference, F.cross_entropy of the score matrix, in float64; and the training losses that
use it against the models' own score matrices."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from convrec.ops.all_items import (
    all_items_cross_entropy,
    all_items_cross_entropy_reference,
    chunk_rows,
    score_all_items,
)


def _inputs(rows: int = 37, items: int = 11, d: int = 8, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    users = torch.randn(rows, d, generator=g, dtype=dtype).requires_grad_()
    vectors = torch.randn(items + 1, d, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(1, items + 1, (rows,), generator=g)
    targets[0], targets[1] = 1, items  # both ends of the id range
    return users, vectors, targets


@pytest.mark.parametrize("rows_per_chunk", [1, 5, 36, 37, 100])
def test_loss_and_gradients_equal_the_reference(rows_per_chunk: int) -> None:
    users, vectors, targets = _inputs()
    loss = all_items_cross_entropy(users, vectors, targets, rows_per_chunk)
    grads = torch.autograd.grad(3 * loss, (users, vectors))  # a gradient other than 1
    expected = all_items_cross_entropy_reference(users, vectors, targets)
    expected_grads = torch.autograd.grad(3 * expected, (users, vectors))
    torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    assert grads[1][0].abs().max() == 0  # the padding row gets nothing


def test_far_apart_scores_stay_finite() -> None:
    """A target scored hundreds below the best item: exp of its shifted score underflows, the
    loss must not (it is log-sum-exp minus the score, never a log of an exp)."""
    users, vectors, targets = _inputs()
    with torch.no_grad():
        users.mul_(100)
    loss = all_items_cross_entropy(users, vectors, targets, 4)
    assert loss.isfinite() and loss > 50
    torch.testing.assert_close(
        loss, all_items_cross_entropy_reference(users, vectors, targets), rtol=1e-13, atol=0
    )


def test_float32_is_as_close_to_float64_as_the_reference() -> None:
    users, vectors, targets = _inputs(rows=300, items=2000, d=32)
    exact = all_items_cross_entropy_reference(users, vectors, targets)
    single = [t.detach().float().requires_grad_() for t in (users, vectors)]
    ours = all_items_cross_entropy(*single, targets, 64)
    theirs = all_items_cross_entropy_reference(*single, targets)
    assert (ours.double() - exact).abs() <= 2 * (theirs.double() - exact).abs() + 1e-6
    exact_grads = torch.autograd.grad(exact, (users, vectors))
    ours_grads = torch.autograd.grad(ours, single)
    for got, want in zip(ours_grads, exact_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-7)


def test_bfloat16_scores_in_float32() -> None:
    """bf16 inputs (autocast on a GPU) get float32 scores, softmax and loss, as
    F.cross_entropy computes under autocast, and bf16 gradients."""
    users, vectors, targets = _inputs(rows=40, items=50, dtype=torch.float32)
    low = [t.detach().bfloat16().requires_grad_() for t in (users, vectors)]
    loss = all_items_cross_entropy(*low, targets, 7)
    expected = F.cross_entropy(score_all_items(*low).float(), targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    grads = torch.autograd.grad(loss, low)
    assert all(g.dtype == torch.bfloat16 for g in grads)


class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("grad_mode", "needs", "matmuls_per_chunk"),
    [(True, (True, True), 3), (True, (True, False), 2), (True, (False, True), 2),
     (False, (True, True), 1)],
)  # fmt: skip
def test_gradient_products_only_when_asked(grad_mode, needs, matmuls_per_chunk) -> None:
    """The gradients are computed in the forward, so it must know whether they are wanted:
    under no_grad, or for inputs that need none, their GEMMs are skipped."""
    users, vectors, targets = _inputs()
    users.requires_grad_(needs[0])
    vectors.requires_grad_(needs[1])
    with torch.set_grad_enabled(grad_mode), _CountMatmuls() as counter:
        loss = all_items_cross_entropy(users, vectors, targets, 10)  # 4 chunks
    assert counter.count == 4 * matmuls_per_chunk
    torch.testing.assert_close(
        loss, all_items_cross_entropy_reference(users, vectors, targets), rtol=1e-13, atol=0
    )
    if grad_mode:
        wanted = [t for t, need in zip((users, vectors), needs, strict=True) if need]
        assert all(g is not None for g in torch.autograd.grad(loss, wanted))


def test_chunk_rows_fit_the_budget() -> None:
    assert chunk_rows(12_103, torch.device("cpu")) == (1 << 20) // 12_103
    assert chunk_rows(12_103, torch.device("cuda")) == (1 << 25) // 12_103
    assert chunk_rows(10**9, torch.device("cpu")) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda u, v, t: (u, v, t.clone().fill_(0)), "target id 0 is not an item"),
        (lambda u, v, t: (u, v, t + 100), "target id 111 is not an item"),
        (lambda u, v, t: (u[:, :5], v, t), "must share D"),
        (lambda u, v, t: (u.float(), v, t), "must share dtype and device"),
        (lambda u, v, t: (u, v, t[:3]), "targets must be (37,) integer ids"),
        (lambda u, v, t: (u[:0], v, t[:0]), "no rows"),
        (lambda u, v, t: (u, v[:1], t), "no item besides padding"),
    ],
)
def test_bad_input_is_one_clear_error(change, message: str) -> None:
    users, vectors, targets = _inputs()
    with pytest.raises(ValueError, match="all_items_cross_entropy: .*" + re.escape(message)):
        all_items_cross_entropy(*change(users.detach(), vectors.detach(), targets))


@pytest.mark.parametrize("model_name", ["convrec", "streaming", "sasrec"])
def test_training_losses_equal_cross_entropy_of_the_scores(model_name: str) -> None:
    """full_softmax_loss and all_positions_loss take the model's user vectors and item table
    (users_and_items=True): loss and every parameter gradient equal F.cross_entropy of the
    model's own score matrices (float64, no dropout)."""
    from convrec import ConvRec
    from convrec.baselines.sasrec import SASRec
    from convrec.training.losses import all_positions_loss, full_softmax_loss
    from tests.helpers import randomise

    torch.manual_seed(0)
    if model_name == "sasrec":
        model = SASRec(20, d_model=8, max_len=9, dropout=0.0)
    else:
        streaming = model_name == "streaming"
        model = ConvRec(20, d_model=8, levels=[(2, 2), (3, 3)], streaming=streaming, dropout=0.0)
    model = randomise(model).double().eval()
    ids = torch.randint(1, 21, (3, 9))
    ids[1, :4] = 0
    params = list(model.parameters())
    cases = [
        (
            lambda: full_softmax_loss(model, ids, torch.tensor([3, 20, 1]), None),
            lambda: F.cross_entropy(model.score(ids), torch.tensor([3, 20, 1])),
        )
    ]
    if model_name != "convrec":  # causal models train every position
        targets = torch.where(ids != 0, torch.randint(1, 21, ids.shape), 0)
        targets[:, :3] = 0
        cases.append(
            (
                lambda: all_positions_loss(model, ids, targets, None),
                lambda: F.cross_entropy(
                    model.score_positions(ids, slots=targets != 0), targets[targets != 0]
                ),
            )
        )
    for fused, reference in cases:
        loss, expected = fused(), reference()
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
        for got, want in zip(grads, expected_grads, strict=True):
            if want is None:
                assert got is None or got.abs().max() == 0
            else:
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_users_and_items_refuses_what_it_cannot_return() -> None:
    from convrec import ConvRec

    model = ConvRec(20, d_model=8, levels=[(2, 2)])
    ids = torch.randint(1, 21, (2, 4))
    with pytest.raises(ValueError, match="users_and_items returns the whole item table"):
        model(ids, torch.ones(2, 3, dtype=torch.long), users_and_items=True)
    users, items = model(ids, users_and_items=True)
    assert users.shape == (2, 8) and items.shape == (21, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_the_float64_reference() -> None:
    """On a GPU (one large chunk by default, and several small ones): float64 equal to the CPU
    reference; float32 within the float64 rule (TF32 off, as the score GEMM would use it)."""
    users, vectors, targets = _inputs(rows=300, items=5000, d=64)
    expected = all_items_cross_entropy_reference(users, vectors, targets)
    expected_grads = torch.autograd.grad(expected, (users, vectors))
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            for rows in (None, 64):
                on_gpu = [t.detach().cuda().to(dtype).requires_grad_() for t in (users, vectors)]
                loss = all_items_cross_entropy(*on_gpu, targets.cuda(), rows)
                grads = torch.autograd.grad(loss, on_gpu)
                torch.testing.assert_close(loss.cpu().double(), expected, rtol=tol, atol=0)
                for got, want in zip(grads, expected_grads, strict=True):
                    torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol)
    finally:
        torch.set_float32_matmul_precision(precision)
