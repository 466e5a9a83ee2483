"""The ``convrec._C`` downscale op against the reference: values and every gradient under the
tolerance rule of docs/design.md section 4, odd shapes, masks, residual input, returned levels,
dropout with the same randomness, gradcheck, opcheck, torch.compile, the encoder, errors; CUDA
when present."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest
import torch

from convrec import ConvRecEncoder
from convrec.ops import LevelParams, downscale
from convrec.ops.dispatch import extension_status
from convrec.ops.level_params import pack_levels
from tests.helpers import check_bf16_autocast, requires_cuda_extension

EXTENSION = extension_status()

# Tolerance rule: |fast - ref64| <= 2 |ref_same_dtype - ref64| + FLOOR * (1 + max |ref64|).
FLOOR = {torch.float64: 1e-10, torch.float32: 4e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
LEVELS = ((4, 4), (3, 2), (5, 5))  # first kernel 4; an overlapping level in the middle


@pytest.fixture(autouse=True)
def _needs_extension(request: pytest.FixtureRequest) -> None:
    """Every test here needs convrec._C, except the one that fails when it is missing."""
    if EXTENSION is not None and request.node.originalname != "test_extension_is_built":
        pytest.skip(EXTENSION)


def test_extension_is_built() -> None:
    """CI builds convrec._C: a broken build must fail here, not skip the suite."""
    if os.environ.get("CONVREC_EXTENSION") == "0":
        pytest.skip("CONVREC_EXTENSION=0: built without the extension on purpose")
    assert EXTENSION is None
    import convrec._C

    assert convrec._C.__file__.endswith(".abi3.so")  # one stable-ABI binary


def gelu_errors(y: torch.Tensor) -> tuple[float, float]:
    """Max |error| of GELU and of its derivative at y against float64."""
    value, grad = (t.cpu().double() for t in torch.ops.convrec.gelu_points(y))
    y64 = y.cpu().double()
    cdf = 0.5 * torch.special.erfc(-y64 / 2**0.5)
    exact_grad = cdf + y64 * torch.exp(-0.5 * y64 * y64) / (2 * torch.pi) ** 0.5
    return (value - y64 * cdf).abs().max().item(), (grad - exact_grad).abs().max().item()


def torch_gelu_errors(y: torch.Tensor) -> tuple[float, float]:
    """Max |error| of PyTorch's GELU and its derivative at y (float32) against float64."""
    exact_value, exact_grad = (t.cpu() for t in torch.ops.convrec.gelu_points(y.double()))
    leaf = y.clone().requires_grad_()
    torch.nn.functional.gelu(leaf).sum().backward()
    value_error = (torch.nn.functional.gelu(y).cpu().double() - exact_value).abs().max().item()
    grad_error = (leaf.grad.cpu().double() - exact_grad).abs().max().item()
    return value_error, grad_error


def test_float32_gelu_is_as_accurate_as_pytorch() -> None:
    """The kernels' own float32 erf/exp polynomials: GELU and GELU' at least as close to
    float64 as PyTorch's float32 GELU, on a dense grid over both polynomial regions."""
    y = torch.linspace(-12, 12, 1_000_001)
    assert max(gelu_errors(y.double())) < 1e-14  # float64 uses the C library
    ours, theirs = gelu_errors(y), torch_gelu_errors(y)
    assert ours[0] <= theirs[0] and ours[1] <= theirs[1]


def make_params(
    d: int, levels: Sequence[tuple[int, int]], heads: int, dtype=torch.float64, device="cpu"
) -> list[LevelParams]:
    """Random level parameters, away from the initial values (alpha = beta = 0.5, unit norm)."""
    params = []
    for kernel, _ in levels:
        params.append(
            LevelParams(
                0.3 * torch.randn(d, d // heads, kernel),
                0.1 * torch.randn(d),
                0.3 * torch.randn(d, d),
                0.1 * torch.randn(d),
                torch.tensor(0.7),
                torch.tensor(-0.4),
                1 + 0.2 * torch.randn(d),
                0.1 * torch.randn(d),
            )
        )
    return [cast(p, dtype, device) for p in params]


def cast(p: LevelParams, dtype: torch.dtype, device="cpu") -> LevelParams:
    """Leaf copies that require grad."""
    return LevelParams(*(t.detach().to(device, dtype).requires_grad_() for t in p))


def run(
    backend: str,
    x: torch.Tensor,
    params: list[LevelParams],
    levels: Sequence[tuple[int, int]],
    heads: int,
    mask: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    seed: int = 1,
    **kwargs,
) -> list[torch.Tensor]:
    """User vectors (and level outputs), then the gradients of x, the residual and every
    parameter for fixed random output gradients."""
    torch.manual_seed(seed)
    strides = [s for _, s in levels]
    out = downscale(x, params, strides, heads, mask, residual=residual, backend=backend, **kwargs)
    outputs = [out.user, *out.levels]
    gen = torch.Generator().manual_seed(seed)
    grads_out = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outputs]
    wrt = [x] + ([residual] if residual is not None else []) + [t for p in params for t in p]
    return [*outputs, *torch.autograd.grad(outputs, wrt, grads_out)]


def compare(
    backend: str,
    dtype: torch.dtype,
    batch: int,
    length: int,
    d: int,
    levels,
    heads: int,
    mask: torch.Tensor | None,
    device: str = "cpu",
    with_residual: bool = False,
    zero_masked: bool = False,
    **kwargs,
) -> None:
    """The tolerance rule for the outputs and all gradients of ``backend`` in ``dtype``; with
    ``zero_masked`` x is zero where the mask leaves it out (as ``gather_embed`` makes it)."""
    params64 = make_params(d, levels, heads)
    x64 = torch.randn(batch, length, d, dtype=torch.float64)
    if zero_masked:
        x64 = x64 * mask[..., None]
    res64 = torch.randn(batch, length, d, dtype=torch.float64) if with_residual else None
    mask = None if mask is None else mask.to(device)

    def leaves(dt, dev):
        x = x64.to(dev, dt).requires_grad_()
        res = None if res64 is None else res64.to(dev, dt).requires_grad_()
        return x, res, [cast(p, dt, dev) for p in params64]

    x, res, ps = leaves(torch.float64, "cpu")
    exact = run(
        "reference", x, ps, levels, heads, None if mask is None else mask.cpu(), res, **kwargs
    )
    x, res, ps = leaves(dtype, device)
    same = run("reference", x, ps, levels, heads, mask, res, **kwargs)
    x, res, ps = leaves(dtype, device)
    fast = run(backend, x, ps, levels, heads, mask, res, **kwargs)
    assert len(fast) == len(exact)
    for i, (f, s, e) in enumerate(zip(fast, same, exact, strict=True)):
        assert f.shape == e.shape and f.dtype == dtype, f"output {i}: {f.shape} {f.dtype}"
        f, s, e = f.cpu().double(), s.cpu().double(), e.cpu()
        allowed = 2 * (s - e).abs().max() + FLOOR[dtype] * (1 + e.abs().max())
        error = (f - e).abs().max()
        assert error <= allowed, f"output {i}: error {error:.3g} > allowed {allowed:.3g}"


def padding_mask(batch: int, length: int, empty_row: bool = True) -> torch.Tensor:
    """Left padding of random lengths; with ``empty_row`` the first row is all padding."""
    lengths = torch.randint(1, length + 1, (batch,))
    if empty_row:
        lengths[0] = 0
    return torch.arange(length) >= (length - lengths)[:, None]


@pytest.mark.parametrize("length", [1, 3, 4, 35, 50, 97])
@pytest.mark.parametrize("mask_aware", [False, True])
def test_matches_reference_odd_lengths(length: int, mask_aware: bool) -> None:
    compare(
        "cpp",
        torch.float32,
        3,
        length,
        8,
        LEVELS,
        2,
        padding_mask(3, length),
        mask_aware=mask_aware,
    )


@pytest.mark.parametrize("heads", [1, 4])
def test_batch_of_one_without_mask(heads: int) -> None:
    compare("cpp", torch.float32, 1, 23, 8, ((2, 2), (5, 5), (7, 7)), heads, None)


@pytest.mark.parametrize("levels", [((3, 1),), ((5, 2), (4, 3)), ((2, 2), (2, 2), (2, 2), (2, 2))])
def test_overlapping_and_deep_schedules(levels) -> None:
    mask = torch.rand(3, 19) > 0.4
    compare("cpp", torch.float32, 3, 19, 8, levels, 2, mask, mask_aware=True)


@pytest.mark.parametrize("masked", ["no mask", "zero where masked", "garbage where masked"])
def test_first_level_reading_x_in_place(masked: str) -> None:
    """kernel == stride and L a multiple of it: level 0 reads x in place, also with a mask when
    x is zero there; otherwise the op copies (forward) and rebuilds (backward) the windows."""
    mask = None if masked == "no mask" else padding_mask(3, 32)
    kwargs = {"zero_masked": masked == "zero where masked", "dropout": 0.2, "training": True}
    compare("cpp", torch.float32, 3, 32, 8, ((4, 4), (2, 2)), 2, mask, mask_aware=True, **kwargs)


def test_float64_matches_reference_exactly() -> None:
    params = make_params(8, LEVELS, 2)
    x = torch.randn(3, 30, 8, dtype=torch.float64, requires_grad=True)
    mask = padding_mask(3, 30)
    fast = run("cpp", x, params, LEVELS, 2, mask, mask_aware=True)
    slow = run("reference", x, params, LEVELS, 2, mask, mask_aware=True)
    for f, s in zip(fast, slow, strict=True):
        torch.testing.assert_close(f, s, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mask_aware", [False, True])
def test_residual_input(mask_aware: bool) -> None:
    """The stack continued after a first level computed elsewhere: an explicit long residual."""
    mask = padding_mask(3, 26)
    compare(
        "cpp", torch.float32, 3, 26, 8, LEVELS, 2, mask, with_residual=True, mask_aware=mask_aware
    )


@pytest.mark.parametrize("mask_aware", [False, True])
def test_return_levels_values_and_gradients(mask_aware: bool) -> None:
    mask = padding_mask(3, 41)
    compare(
        "cpp", torch.float32, 3, 41, 8, LEVELS, 2, mask, return_levels=True, mask_aware=mask_aware
    )


def test_non_contiguous_inputs() -> None:
    params = make_params(8, LEVELS, 1, torch.float32)
    base = torch.randn(3, 8, 30)
    x = base.transpose(1, 2)  # (3, 30, 8), channel stride 30
    mask = (torch.rand(30, 3) > 0.3).t()
    assert not x.is_contiguous() and not mask.is_contiguous()
    x.requires_grad_()
    fast = run("cpp", x, params, LEVELS, 1, mask, mask_aware=True)
    slow = run("reference", x, params, LEVELS, 1, mask, mask_aware=True)
    for f, s in zip(fast, slow, strict=True):
        torch.testing.assert_close(f, s, rtol=1e-4, atol=1e-5)


def test_all_padding_rows_are_zero_when_mask_aware() -> None:
    params = make_params(8, LEVELS, 2, torch.float32)
    x = torch.randn(2, 12, 8)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, 5:] = True
    out = downscale(x, params, [s for _, s in LEVELS], 2, mask, mask_aware=True, backend="cpp")
    assert (out.user[0] == 0).all() and out.user[1].abs().sum() > 0


def test_dropout_same_randomness_as_reference() -> None:
    """The kernels hash the seed the call drew as the reference does (``StackDropout``): one
    torch seed gives both backends the same dropout, so training-mode values and gradients
    match."""
    mask = padding_mask(3, 50)
    kwargs = {"dropout": 0.3, "training": True, "mask_aware": True}
    compare("cpp", torch.float32, 3, 50, 8, LEVELS, 2, mask, **kwargs)
    params = make_params(8, LEVELS, 2, torch.float32)
    x = torch.randn(3, 50, 8, requires_grad=True)
    train = run("cpp", x, params, LEVELS, 2, mask, **kwargs)[0]
    other_seed = run("cpp", x, params, LEVELS, 2, mask, seed=2, **kwargs)[0]
    evaluated = run("cpp", x, params, LEVELS, 2, mask, mask_aware=True)[0]
    assert not torch.allclose(train, other_seed) and not torch.allclose(train, evaluated)


def test_zero_levels_is_the_masked_mean() -> None:
    x = torch.randn(3, 9, 8)
    mask = padding_mask(3, 9, empty_row=False)
    out = downscale(x, [], [], 1, mask, mask_aware=True, backend="cpp")
    expected = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(out.user, expected)


OVERLAPPING = (((3, 2), (2, 2)), 7)  # (levels, L): level 0 needs its own window matrix
TILED = (((2, 2), (3, 3)), 8)  # kernel == stride, no padding: level 0 may read x in place


def _op_args(
    dtype=torch.float64,
    keep: bool = True,
    device="cpu",
    case=OVERLAPPING,
    zero_masked=False,
    paper_norm=False,
) -> tuple:
    """Raw ``convrec::downscale`` arguments: packed parameters, a fixed dropout seed; with
    ``zero_masked`` x is zero where the mask leaves it out."""
    (levels, length), heads, batch, d = case, 2, 2, 4
    packed = pack_levels(make_params(d, levels, heads, dtype, device), heads)
    mask = torch.rand(batch, length, device=device) > 0.3
    x = torch.randn(batch, length, d, dtype=dtype, device=device)
    x = (x * mask[..., None] if zero_masked else x).requires_grad_()
    residual = torch.randn(batch, length, d, dtype=dtype, device=device, requires_grad=True)
    seed = torch.tensor([12345, 678], device=device) if keep else None
    return (
        x,
        residual,
        mask,
        packed.flat.detach().clone().requires_grad_(),
        [k for k, _ in levels],
        [s for _, s in levels],
        heads,
        True,
        seed,
        0.2 if keep else 0.0,
        1e-6 if paper_norm else 1e-5,
        paper_norm,
        True,
    )


@pytest.mark.parametrize("mask_aware", [False, True])
def test_gradcheck_float64(mask_aware: bool) -> None:
    params = make_params(4, ((3, 2), (2, 2)), 2)
    x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :4] = False
    flat = [t for p in params for t in p]

    def fn(x, residual, *ts):
        ps = [LevelParams(*ts[i : i + 8]) for i in range(0, len(ts), 8)]
        out = downscale(
            x, ps, [2, 2], 2, mask, mask_aware, residual=residual, return_levels=True, backend="cpp"
        )
        return out.user, *out.levels

    assert torch.autograd.gradcheck(fn, (x, residual, *flat))


def gradcheck_op(args: tuple) -> bool:
    """gradcheck of the raw op over x, the residual and the packed parameters."""
    x, residual, mask, params, *rest = args

    def fn(x, residual, params):
        user, levels, _ = torch.ops.convrec.downscale(x, residual, mask, params, *rest)
        return user, *levels

    return torch.autograd.gradcheck(fn, (x, residual, params))


@pytest.mark.parametrize("mask_aware", [False, True])
def test_paper_norm_matches_reference(mask_aware: bool) -> None:
    """The paper code's LayerNorm (unbiased std, eps added to it) in the kernels: values and
    gradients, with dropout, returned levels and a residual, under the tolerance rule; float64
    gradcheck of the raw op."""
    mask = padding_mask(3, 41)
    kwargs = {"dropout": 0.2, "training": True, "return_levels": True, "eps": 1e-6}
    compare(
        "cpp",
        torch.float32,
        3,
        41,
        8,
        LEVELS,
        2,
        mask,
        with_residual=True,
        mask_aware=mask_aware,
        paper_norm=True,
        **kwargs,
    )
    assert gradcheck_op(_op_args(paper_norm=True))


# the three level-0 paths: own window matrix; x in place; x in place but not zero where masked
# (the forward builds a temporary window matrix, the backward rebuilds it)
LEVEL0_PATHS = {
    "overlapping": {"case": OVERLAPPING},
    "tiled-in-place": {"case": TILED, "zero_masked": True},
    "tiled-rebuilt": {"case": TILED},
    "paper-norm": {"case": OVERLAPPING, "paper_norm": True},
}


@pytest.mark.parametrize("path", list(LEVEL0_PATHS))
def test_gradcheck_op_with_dropout_masks(path: str) -> None:
    """The raw op with a fixed dropout seed (the dispatcher draws a new one per call)."""
    assert gradcheck_op(_op_args(**LEVEL0_PATHS[path]))


@pytest.mark.parametrize("path", list(LEVEL0_PATHS))
def test_opcheck(path: str) -> None:
    args = _op_args(torch.float32, **LEVEL0_PATHS[path])
    torch.library.opcheck(torch.ops.convrec.downscale.default, args)
    _, _, saved = torch.ops.convrec.downscale(*args)
    assert (saved[0].numel() == 0) == (
        LEVEL0_PATHS[path]["case"] is TILED
    )  # no copy of x saved in place
    torch.library.opcheck(torch.ops.convrec.downscale.default, _op_args(keep=False))


@pytest.mark.parametrize("path", list(LEVEL0_PATHS))
def test_opcheck_backward(path: str) -> None:
    args = _op_args(**LEVEL0_PATHS[path])
    args = torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, args)
    user, levels, saved = torch.ops.convrec.downscale(*args)
    grad_levels = [torch.randn_like(level) for level in levels]
    x, _, mask, params, kernels, strides, heads, _, seed, p, eps, paper_norm, _ = args
    backward_args = (
        torch.randn_like(user),
        grad_levels,
        x,
        mask,
        params,
        kernels,
        strides,
        heads,
        True,
        True,
        seed,
        p,
        eps,
        paper_norm,
        x.shape[1],
        saved,
    )
    torch.library.opcheck(torch.ops.convrec.downscale_backward.default, backward_args)


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(dynamic: bool) -> None:
    params = make_params(8, LEVELS, 2, torch.float32)

    def fn(x, mask):
        return downscale(x, params, [4, 2, 5], 2, mask, True, backend="cpp").user

    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    for length in (35, 50) if dynamic else (35,):
        x = torch.randn(3, length, 8, requires_grad=True)
        m = padding_mask(3, length)
        eager = fn(x, m)
        got = compiled(x, m)
        torch.testing.assert_close(got, eager)
        wrt = [x, *params[0]]
        eager_grads = torch.autograd.grad(eager.square().sum(), wrt)
        got_grads = torch.autograd.grad(got.square().sum(), wrt)
        for g, e in zip(got_grads, eager_grads, strict=True):
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("training", [False, True])
def test_encoder_backends_agree(training: bool) -> None:
    reference = ConvRecEncoder(16, heads=2, dropout=0.2, mask_aware=True, backend="reference")
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.3 * torch.randn_like(p))
    fast = ConvRecEncoder(16, heads=2, dropout=0.2, mask_aware=True, backend="cpp")
    fast.load_state_dict(reference.state_dict())
    reference.train(training)
    fast.train(training)
    x = torch.randn(4, 50, 16, requires_grad=True)
    mask = padding_mask(4, 50)
    outs = []
    for encoder in (reference, fast):
        torch.manual_seed(3)
        user = encoder(x, mask)
        grads = torch.autograd.grad(user.square().sum(), [x, *encoder.parameters()])
        outs.append([user, *grads])
    for f, r in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(f, r, rtol=1e-4, atol=2e-5)


def test_errors_name_the_problem() -> None:
    params = make_params(8, LEVELS, 2, torch.float32)
    x = torch.randn(2, 10, 8)
    strides = [s for _, s in LEVELS]
    with pytest.raises(TypeError, match=r"supports torch\.float32, torch\.float64 on cpu"):
        downscale(x.half(), params, strides, 2, backend="cpp")
    with pytest.raises(TypeError, match=r"level parameters have dtype torch\.float64"):
        downscale(x, make_params(8, LEVELS, 2), strides, 2, backend="cpp")
    with pytest.raises(ValueError, match=r"level 1 linear_weight must have shape \(8, 8\)"):
        bad = [params[0], params[1]._replace(linear_weight=torch.randn(8, 4)), params[2]]
        downscale(x, bad, strides, 2, backend="cpp")
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        downscale(x, params, strides, 2, torch.ones(2, 10), backend="cpp")
    with pytest.raises(RuntimeError, match="backend 'cuda' runs on cuda tensors, got cpu"):
        downscale(x, params, strides, 2, backend="cuda")
    with pytest.raises(ValueError, match="residual must match x"):
        downscale(x, params, strides, 2, residual=torch.randn(2, 9, 8), backend="cpp")
    args = list(_op_args(torch.float32))
    args[3] = args[3][:-1]
    with pytest.raises(RuntimeError, match=r"params must have shape \(108,\), got \(107,\)"):
        torch.ops.convrec.downscale(*args)
    args = list(_op_args(torch.float32))
    args[8] = torch.tensor([1, 2, 3])
    with pytest.raises(RuntimeError, match=r"dropout_seed must have shape \(2,\)"):
        torch.ops.convrec.downscale(*args)


# --------------------------------------------------------------------------------- CUDA ----


@requires_cuda_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_aware", [False, True])
def test_cuda_matches_reference(dtype: torch.dtype, mask_aware: bool) -> None:
    for length in (1, 4, 50, 97):
        mask = padding_mask(3, length)
        compare(
            "cuda",
            dtype,
            3,
            length,
            64,
            LEVELS,
            2,
            mask,
            "cuda",
            True,
            mask_aware=mask_aware,
            return_levels=True,
        )


@requires_cuda_extension
def test_cuda_dropout_same_randomness_as_reference() -> None:
    """Same seed, same CUDA generator call, same hash: the masks match the reference's
    (a CPU float64 oracle would draw its seed from another generator, so compare in float32)."""
    params = make_params(32, LEVELS, 2, torch.float32, "cuda")
    x = torch.randn(3, 50, 32, device="cuda", requires_grad=True)
    mask = padding_mask(3, 50).cuda()
    kwargs = {"dropout": 0.3, "training": True, "mask_aware": True}
    fast = run("cuda", x, params, LEVELS, 2, mask, **kwargs)
    slow = run("reference", x, params, LEVELS, 2, mask, **kwargs)
    for f, r in zip(fast, slow, strict=True):
        torch.testing.assert_close(f, r, rtol=1e-4, atol=2e-5)


@requires_cuda_extension
def test_cuda_gradcheck_float64() -> None:
    assert gradcheck_op(_op_args(device="cuda"))
    torch.library.opcheck(
        torch.ops.convrec.downscale.default, _op_args(torch.float32, device="cuda")
    )


@requires_cuda_extension
def test_cuda_gelu_is_as_accurate_as_pytorch() -> None:
    """The same polynomials on the GPU (nvcc may fuse multiply-adds, so allow that or CUDA's
    own GELU error, whichever is larger)."""
    y = torch.linspace(-12, 12, 1_000_001)
    ours, cpu, theirs = gelu_errors(y.cuda()), gelu_errors(y), torch_gelu_errors(y.cuda())
    for i in range(2):
        assert ours[i] <= max(theirs[i], 1.1 * cpu[i])


@requires_cuda_extension
def test_cuda_runs_on_the_current_stream() -> None:
    params = make_params(64, LEVELS, 1, torch.float32, "cuda")
    x = torch.randn(8, 300, 64, device="cuda")
    expected = downscale(x, params, [4, 2, 5], 1, backend="cuda").user
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = downscale(x, params, [4, 2, 5], 1, backend="cuda").user
    stream.synchronize()
    torch.testing.assert_close(got, expected)


@requires_cuda_extension
def test_cuda_encoder_compiles() -> None:
    encoder = ConvRecEncoder(64, heads=2, mask_aware=True, backend="cuda").cuda().eval()
    x = torch.randn(4, 200, 64, device="cuda")
    mask = padding_mask(4, 200).cuda()
    compiled = torch.compile(encoder, fullgraph=True)
    torch.testing.assert_close(compiled(x, mask), encoder(x, mask))


@requires_cuda_extension
def test_cuda_autocast_runs_in_the_autocast_dtype() -> None:
    """Under ``torch.autocast`` the op casts x and the packed parameters to bf16; the user
    vectors come back in bf16 close to the float64 reference, the gradient reaches the fp32
    parameter in fp32."""
    check_bf16_autocast("cuda")
