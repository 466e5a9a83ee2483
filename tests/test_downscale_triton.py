"""The whole-stack Triton ``downscale`` (``convrec.ops.downscale_triton``) against the reference:
float64 to round-off over schedules (overlapping windows included), heads, masks, mask-aware
pools, a residual input and dropout with the same seed; the float32 tolerance rule; opcheck of
both custom ops; the per-level fallback; errors; CUDA dtypes and autocast when a GPU is present.
Runs in the Triton interpreter on CPU (``tests/conftest.py``)."""

from __future__ import annotations

import pytest
import torch

from convrec import ConvRecEncoder
from convrec.ops import downscale
from convrec.ops.dispatch import set_backend, triton_kernels
from convrec.ops.downscale_triton import MAX_WIDTH, whole_stack_problem
from convrec.ops.level_params import level_size, pack_levels
from tests.helpers import CUDA, DEVICE, check_bf16_autocast, randomise, requires_triton
from tests.test_downscale import compare, make_params, padding_mask, run

pytestmark = requires_triton

SCHEDULES = {
    "tiling": ((2, 2), (3, 3)),
    "overlapping": ((3, 2), (2, 2), (4, 3)),
    "mixed": ((4, 4), (3, 2), (5, 5)),
    "one-level-stride-1": ((3, 1),),
}


def float64_case(levels, heads, mask_aware, dropout, residual, length=23, d=16, seed=3, batch=3):
    """Outputs and every gradient of the Triton stack and the reference, float64, same seed."""
    torch.manual_seed(seed)
    params = make_params(d, levels, heads, torch.float64, DEVICE)
    shape = (batch, length, d)
    x = torch.randn(shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    res = None
    if residual:
        res = torch.randn(shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mask = padding_mask(batch, length).to(DEVICE)
    kwargs = {"mask_aware": mask_aware, "dropout": dropout, "training": dropout > 0}
    fast = run("triton", x, params, levels, heads, mask, res, **kwargs)
    slow = run("reference", x, params, levels, heads, mask, res, **kwargs)
    return fast, slow


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("mask_aware", [False, True])
def test_float64_equals_reference(schedule: str, heads: int, mask_aware: bool) -> None:
    fast, slow = float64_case(SCHEDULES[schedule], heads, mask_aware, 0.0, False)
    for i, (f, s) in enumerate(zip(fast, slow, strict=True)):
        torch.testing.assert_close(f, s, rtol=1e-10, atol=1e-12, msg=f"output {i}")


@pytest.mark.parametrize("schedule", ["tiling", "overlapping"])
@pytest.mark.parametrize("mask_aware", [False, True])
def test_float64_dropout_and_residual(schedule: str, mask_aware: bool) -> None:
    """Same seed, same keep decisions (recomputed by the kernels both ways); the residual input
    gets its own gradient."""
    fast, slow = float64_case(SCHEDULES[schedule], 2, mask_aware, 0.3, True)
    assert len(fast) == 3 + 8 * len(SCHEDULES[schedule])  # user, x, residual, parameters
    for i, (f, s) in enumerate(zip(fast, slow, strict=True)):
        torch.testing.assert_close(f, s, rtol=1e-10, atol=1e-12, msg=f"output {i}")


@pytest.mark.parametrize(
    ("schedule", "split", "chunks"), [("tiling", 2, 3), ("mixed", 1, 3), ("overlapping", 0, 1)]
)
@pytest.mark.parametrize("mask_aware", [False, True])
def test_chunked_rows_equal_reference(
    schedule: str, split: int, chunks: int, mask_aware: bool
) -> None:
    """Long enough rows are split into chunks over the leading kernel == stride levels (one
    program each, then one per row for the rest): the same float64 results, dropout included."""
    levels = SCHEDULES[schedule]
    kernels_module = triton_kernels("downscale")
    kernels, strides = tuple(k for k, _ in levels), tuple(s for _, s in levels)
    layout = kernels_module.stack_layout(40, kernels, strides, 16, 2)
    budget = triton_kernels("launch").stack_chunks(torch.device(DEVICE))
    plan = kernels_module.chunking(layout, 2, *budget)
    assert (plan.split, plan.chunks) == (split, chunks)
    fast, slow = float64_case(levels, 2, mask_aware, 0.3, True, length=40, batch=2)
    for i, (f, s) in enumerate(zip(fast, slow, strict=True)):
        torch.testing.assert_close(f, s, rtol=1e-10, atol=1e-12, msg=f"output {i}")


@pytest.mark.parametrize("length", [1, 4, 37])
@pytest.mark.parametrize("mask_aware", [False, True])
def test_float32_tolerance_rule(length: int, mask_aware: bool) -> None:
    mask = padding_mask(3, length)
    levels = SCHEDULES["mixed"]
    compare("triton", torch.float32, 3, length, 16, levels, 2, mask, DEVICE, mask_aware=mask_aware)


def test_without_mask_and_batch_of_one() -> None:
    compare("triton", torch.float32, 1, 29, 16, SCHEDULES["overlapping"], 1, None, DEVICE)


def test_width_not_a_power_of_two() -> None:
    """D = 24: the channel tile (32) is wider than D; padded channels must stay out of the
    LayerNorm statistics and of every gradient."""
    compare("triton", torch.float32, 2, 19, 24, SCHEDULES["mixed"], 3, padding_mask(2, 19), DEVICE)


def test_return_levels_takes_the_per_level_path() -> None:
    assert whole_stack_problem(50, 16, return_levels=True) is not None
    assert whole_stack_problem(50, MAX_WIDTH + 1, return_levels=False) is not None
    assert whole_stack_problem(50, MAX_WIDTH, return_levels=False) is None
    assert "int32" in whole_stack_problem(2**23, 64, return_levels=False)
    assert whole_stack_problem(2**22, 64, return_levels=False) is None
    compare(
        "triton",
        torch.float32,
        2,
        21,
        16,
        SCHEDULES["tiling"],
        2,
        padding_mask(2, 21),
        DEVICE,
        return_levels=True,
    )


def test_kernel_layout_repeats_the_packed_layout() -> None:
    """The kernels' copy of ``PackedLevels``' offsets (the level stack's parameters are read
    and written at these offsets) equals ``level_params``'s."""
    kernels_module = triton_kernels("downscale")
    for d, heads, kernels in ((8, 2, (3, 2, 4)), (64, 4, (2, 5, 7)), (24, 3, (1,))):
        layout = kernels_module.stack_layout(50, kernels, (1,) * len(kernels), d, heads)
        starts = [row[kernels_module.PARAM.value] for row in layout.rows]
        sizes = [level_size(d, heads, k) for k in kernels]
        assert starts == [sum(sizes[:i]) for i in range(len(kernels))]
    packed = pack_levels(make_params(8, ((3, 3),), 2), 2)
    views = packed.unpack()[0]
    assert views.alpha.data_ptr() == packed.flat[8 * 4 * 3 + 8 + 64 + 8 :].data_ptr()


def _op_args(dtype=torch.float64, dropout=True, residual=True, mask_aware=True):
    levels = SCHEDULES["overlapping"]
    packed = pack_levels(make_params(8, levels, 2, dtype, DEVICE), 2)
    x = torch.randn(2, 11, 8, dtype=dtype, device=DEVICE, requires_grad=True)
    res = torch.randn_like(x).requires_grad_() if residual else None
    mask = padding_mask(2, 11, empty_row=False).to(DEVICE)
    seed = torch.tensor([12345, 678], device=DEVICE) if dropout else None
    flat = packed.flat.detach().requires_grad_()
    kernels, strides = [k for k, _ in levels], [s for _, s in levels]
    return (x, res, mask, flat, kernels, strides, 2, mask_aware, seed, 0.2, 1e-5)


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(dropout: bool, residual: bool) -> None:
    args = _op_args(torch.float32, dropout, residual)
    torch.library.opcheck(torch.ops.convrec.downscale_triton.default, args)
    detached = torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, args)
    user, workspace, fold = torch.ops.convrec.downscale_triton(*detached)
    x, res, mask, flat, kernels, strides, heads, mask_aware, seed, p, eps = detached
    backward_args = (torch.randn_like(user), x, res, mask, flat, fold, workspace, kernels,
                     strides, heads, mask_aware, seed, p, eps)  # fmt: skip
    torch.library.opcheck(torch.ops.convrec.downscale_triton_backward.default, backward_args)


def test_gradcheck_with_fixed_dropout_seed() -> None:
    """The raw op in float64 with a fixed seed (the dispatcher draws a new one per call)."""
    x, res, mask, flat, *rest = _op_args()

    def user(x, res, flat):
        return torch.ops.convrec.downscale_triton(x, res, mask, flat, *rest)[0]

    assert torch.autograd.gradcheck(user, (x, res, flat), eps=1e-6, atol=1e-7, fast_mode=True)


def test_encoder_backends_agree_in_training() -> None:
    """The encoder in training mode (dropout from its own seed draw) on both backends, float64."""
    reference = randomise(ConvRecEncoder(16, heads=2, dropout=0.2, mask_aware=True)).double()
    set_backend(reference, "reference")
    fast = ConvRecEncoder(16, heads=2, dropout=0.2, mask_aware=True, backend="triton").double()
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(3, 40, 16, dtype=torch.float64, device=DEVICE)
    mask = padding_mask(3, 40).to(DEVICE)
    outs = []
    for encoder in (reference.to(DEVICE).train(), fast.to(DEVICE).train()):
        torch.manual_seed(11)
        user = encoder(x, mask)
        user.square().sum().backward()
        outs.append((user, encoder.stack_weights.grad))
    for f, r in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_compiled_encoder_equals_eager_with_dynamic_lengths() -> None:
    """torch.compile(fullgraph, dynamic) traces the custom ops through their fake
    implementations (buffer sizes from symbolic lengths) and runs the same kernels."""
    encoder = ConvRecEncoder(16, ((2, 2), (3, 3)), heads=2, dropout=0.0, mask_aware=True)
    set_backend(encoder, "triton")
    encoder = randomise(encoder).to(DEVICE).train()
    compiled = torch.compile(encoder, fullgraph=True, dynamic=True)
    for length in (30, 41):
        x = torch.randn(2, length, 16, device=DEVICE, requires_grad=True)
        mask = padding_mask(2, length, empty_row=False).to(DEVICE)
        results = []
        for run_encoder in (compiled, encoder):
            user = run_encoder(x, mask)
            grads = torch.autograd.grad(user.square().sum(), [x, encoder.stack_weights])
            results.append((user, *grads))
        for got, expected in zip(*results, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_errors_name_the_problem() -> None:
    params = make_params(8, SCHEDULES["tiling"], 2, torch.float32, DEVICE)
    x = torch.randn(2, 9, 8, device=DEVICE)
    if not CUDA:
        with pytest.raises(TypeError, match="the Triton downscale supports"):
            downscale(x.half(), [p._replace() for p in params], [2, 3], 2, backend="triton")
    with pytest.raises(ValueError, match="x has width 8 but the levels D=16"):
        downscale(x, make_params(16, SCHEDULES["tiling"], 2, torch.float32, DEVICE), [2, 3], 2,
                  backend="triton")  # fmt: skip
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        downscale(x, params, [2, 3], 2, torch.ones(2, 9, device=DEVICE), backend="triton")


# --------------------------------------------------------------------------------- CUDA ----

needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a GPU")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_aware", [False, True])
def test_cuda_dtypes_follow_the_tolerance_rule(dtype: torch.dtype, mask_aware: bool) -> None:
    for length in (4, 50, 3000):  # 3000: chunked rows (1,024 positions a chunk)
        mask = padding_mask(3, length)
        args = (3, length, 64, SCHEDULES["mixed"], 2, mask, "cuda", True)
        compare("triton", dtype, *args, mask_aware=mask_aware)


@needs_gpu
def test_cuda_float64_equals_reference() -> None:
    fast, slow = float64_case(SCHEDULES["overlapping"], 2, True, 0.3, True, length=200, d=64)
    for f, s in zip(fast, slow, strict=True):
        torch.testing.assert_close(f, s, rtol=1e-10, atol=1e-12)


@needs_gpu
def test_cuda_autocast_runs_in_the_autocast_dtype() -> None:
    check_bf16_autocast("triton")


@needs_gpu
def test_cuda_encoder_compiles() -> None:
    encoder = ConvRecEncoder(64, heads=2, mask_aware=True, backend="triton").cuda().eval()
    x = torch.randn(4, 200, 64, device="cuda")
    mask = padding_mask(4, 200).cuda()
    compiled = torch.compile(encoder, fullgraph=True)
    torch.testing.assert_close(compiled(x, mask), encoder(x, mask))
