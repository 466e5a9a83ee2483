"""Helpers the test files share: where the kernel tests run, the float64 tolerance rule and the
backend comparison built on it, random catalogues and histories, parameter noise."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convrec import ConvRecEncoder
from convrec.ops.dispatch import extension_status, set_backend, triton_status
from convrec.ops.item_tables import csr_from_lists

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # where the Triton tests put their tensors
requires_triton = pytest.mark.skipif(
    triton_status(DEVICE) is not None, reason=f"Triton cannot run here: {triton_status(DEVICE)}"
)
# the convrec._C tests: on the CPU, and the CUDA ones
requires_extension = pytest.mark.skipif(
    extension_status() is not None, reason=f"needs convrec._C: {extension_status()}"
)
requires_cuda_extension = pytest.mark.skipif(
    extension_status() is not None or not CUDA, reason="needs CUDA and convrec._C"
)
# (device, dtype) of the kernel tests: fp32 in the interpreter (its bf16 arithmetic is wrong);
# fp32, fp16 and bf16 on a GPU.
DEVICE_DTYPES = (
    [("cuda", d) for d in (torch.float32, torch.float16, torch.bfloat16)]
    if CUDA
    else [("cpu", torch.float32)]
)


def assert_tolerance(name: str, actual: Tensor, reference: Tensor, exact: Tensor) -> None:
    """docs/design.md's rule: the kernel's error against the float64 result is at most twice the
    same-dtype reference's error, plus a floor of 64 ulps of the result's magnitude."""
    exact = exact.detach().double()
    scale = float(exact.abs().max().clamp(min=1.0)) if exact.numel() else 1.0
    error = float((actual.detach().double() - exact).abs().max()) if exact.numel() else 0.0
    ref_error = float((reference.detach().double() - exact).abs().max()) if exact.numel() else 0.0
    floor = 64 * torch.finfo(actual.dtype).eps * scale
    assert error <= 2 * ref_error + floor, (
        f"{name}: kernel error {error:.3g} > 2 x reference error {ref_error:.3g} + {floor:.3g}"
    )


def compare_backends(
    run: Callable[..., Sequence[Tensor | None]],
    inputs: dict[str, Tensor],
    wrt: Sequence[str],
    dtype: torch.dtype,
    backend: str = "triton",
) -> None:
    """Run ``run(backend, **inputs)`` in float64 and ``dtype`` on the reference and in ``dtype``
    on ``backend`` (Triton by default); compare every output (bool outputs exactly) and the
    gradients of ``wrt`` of a fixed random projection of the float outputs, with
    ``assert_tolerance``.

    Floating inputs are cast to the dtype with ``.to``: views stay views when it is theirs.
    """
    results = {}
    projections: list[Tensor] = []
    for label, name, dt in (
        ("exact", "reference", torch.float64),
        ("reference", "reference", dtype),
        ("kernel", backend, dtype),
    ):
        tensors = {
            k: v.to(dt).detach().requires_grad_(k in wrt) if v.is_floating_point() else v
            for k, v in inputs.items()
        }
        outs = [o for o in run(name, **tensors) if o is not None]
        floats = [o for o in outs if o.is_floating_point()]
        if not projections:
            gen = torch.Generator().manual_seed(1)
            projections = [
                torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)
                for o in floats
            ]
        loss = sum((o.double() * p).sum() for o, p in zip(floats, projections, strict=True))
        grads = torch.autograd.grad(loss, [tensors[k] for k in wrt], allow_unused=True)
        results[label] = (outs, grads)
    (exact, exact_grads), (ref, ref_grads), (out, out_grads) = results.values()
    for i, (e, r, o) in enumerate(zip(exact, ref, out, strict=True)):
        assert o.shape == e.shape and o.dtype == r.dtype, f"output {i}: {o.shape} {o.dtype}"
        if o.is_floating_point():
            assert_tolerance(f"output {i}", o, r, e)
        else:
            assert torch.equal(o, r), f"output {i} differs"
    for name, e, r, o in zip(wrt, exact_grads, ref_grads, out_grads, strict=True):
        assert o.dtype == r.dtype and o.shape == r.shape, f"grad {name}: {o.dtype} {o.shape}"
        assert_tolerance(f"grad {name}", o, r, e)


def random_catalogue(
    num_items: int, num_attrs: int, max_attrs: int, device: str, seed: int = 0
) -> tuple[Tensor, Tensor, list[list[int]]]:
    """CSR (offsets, ids) of items 0..num_items: item 0 and every 4th item without attributes,
    others with 1..max_attrs ids, repeats allowed."""
    gen = torch.Generator().manual_seed(seed)
    lists: list[list[int]] = [[]]
    for item in range(1, num_items + 1):
        count = 0 if item % 4 == 0 else int(torch.randint(1, max_attrs + 1, (1,), generator=gen))
        lists.append(torch.randint(0, num_attrs, (count,), generator=gen).tolist())
    offsets, ids = csr_from_lists(lists)
    return offsets.to(device), ids.to(device), lists


def histories(batch: int, length: int, num_items: int, device: str, seed: int = 0) -> Tensor:
    """Left-padded (B, L) ids; row 0 is all padding when B > 1, the others padded variously."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, num_items + 1, (batch, length), generator=gen)
    for row in range(batch):
        ids[row, : (length * row) // (batch + 1)] = 0
    if batch > 1:
        ids[0] = 0
    return ids.to(device)


def reserve_int32(size: int) -> Tensor:
    """An int32 tensor of ``size`` > 2^31 elements: on CPU only address space (pages untouched
    are never backed), on a GPU 8 GiB of memory. Skips the test where that is refused."""
    try:
        return torch.empty(size, dtype=torch.int32, device=DEVICE)
    except (RuntimeError, MemoryError) as error:
        pytest.skip(f"cannot reserve {size * 4 / 2**30:.0f} GiB for int64-offset test: {error}")


def paper_stack(encoder: ConvRecEncoder, x: torch.Tensor) -> torch.Tensor:
    """Written from the paper code's structure: per-level F.pad, nn.AvgPool1d, one Conv1d per
    head on channels-first slices, Linear, GELU, LayerNorm(y + a * pool(x) + b * pool(r))."""
    x_res = x
    length = x.shape[1]
    for (k, s), p in zip(encoder.levels, encoder.level_params(), strict=True):
        heads = encoder.heads
        pad = k - length if length < k else (0 if (length - k) % s == 0 else s - (length - k) % s)
        xt = F.pad(x.transpose(1, 2), (pad, 0))  # (B, D, L + pad)
        rt = F.pad(x_res.transpose(1, 2), (pad, 0))
        pool = nn.AvgPool1d(k, s)
        head_dim = x.shape[2] // heads
        heads_out = []
        for h in range(heads):
            sl = slice(h * head_dim, (h + 1) * head_dim)
            w, b = p.conv_weight[sl], p.conv_bias[sl]
            heads_out.append(F.conv1d(xt[:, sl], w, b, stride=s))
        y = F.linear(torch.cat(heads_out, dim=1).transpose(1, 2), p.linear_weight, p.linear_bias)
        y = F.gelu(y)
        x_pool, x_res = pool(xt).transpose(1, 2), pool(rt).transpose(1, 2)
        mixed = y + p.alpha * x_pool + p.beta * x_res
        x = F.layer_norm(mixed, (x.shape[2],), p.norm_weight, p.norm_bias, encoder.norm_eps)
        length = x.shape[1]
    return x.mean(1)


def randomise(module: nn.Module) -> nn.Module:
    """Add N(0, 0.3) noise to every parameter, so identity or zero initialisations cannot hide
    a wrongly wired tensor."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module


def check_bf16_autocast(backend: str) -> None:
    """Under ``torch.autocast`` (CUDA, bf16) an encoder on ``backend`` returns bf16 user vectors
    close to the float64 reference, and the gradient reaches the fp32 packed parameter in fp32
    (the autocast tests of the CUDA extension and of Triton)."""
    encoder = randomise(ConvRecEncoder(64, heads=2, backend=backend)).cuda().eval()
    x = torch.randn(4, 100, 64, device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        user = encoder(x)
    assert user.dtype == torch.bfloat16
    user.float().square().sum().backward()
    grad = encoder.stack_weights.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0
    set_backend(encoder.double(), "reference")
    exact = encoder(x.double())
    assert (user.double() - exact).abs().max() <= 0.05 * (1 + exact.abs().max())
