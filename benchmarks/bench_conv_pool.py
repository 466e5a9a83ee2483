"""Microbenchmarks of ``conv_pool`` (one level: strided grouped conv + two average pools).

Run: ``pytest benchmarks/bench_conv_pool.py`` on a CUDA machine (skips without one;
``CONVREC_BENCH_INTERPRET=1`` runs tiny shapes in the Triton interpreter).

Arithmetic intensity (FLOPs per compulsory byte), b bytes per element, k = s, L_out = L / k,
Dh = D / H:

* forward: FLOPs = 2 B L_out D Dh k (conv) + 4 B L_out D k (pools) = 2 B L D (Dh + 2);
  bytes = b (2 B L D (x, residual) + 3 B L_out D (three outputs) + D Dh k) + 4 B L_out,
  so AI ~ 2 (Dh + 2) / (b (2 + 3 / k)).
  D = 64, H = 1, k = 2: 18.9 FLOP/B in bf16, 9.4 in fp32; D = 256, H = 1, k = 2 (one wide
  head): 73.7 bf16, 36.9 fp32; D = 256, H = 4, k = 7: 27.2 bf16, 13.6 fp32.
* backward: FLOPs = 4 B L D Dh (input and weight gradients); bytes = b B L D (3 / k (three
  output gradients) + 1 (x) + 2 (two input gradients)) plus the fp32 weight partials, so
  AI ~ 4 Dh / (b (3 + 3 / k)): D = 256, H = 1, k = 2: 114 bf16, 57 fp32.

H200 ridge points against the 4.3 TB/s copy ceiling: bf16 tensor cores (989 TFLOP/s dense)
230 FLOP/B, TF32 115, fp32 CUDA cores (67 TFLOP/s) 15.6. So in bf16 every shape here is
memory-bound (judge it in GB/s); in fp32, where the kernel keeps exact fp32 products, the wide
single head is compute-bound on the CUDA cores (judge it in FLOP/s) and Dh = 64 sits at the ridge.
"""

from __future__ import annotations

import pytest
import torch
from kernel_bench import (
    MODES,
    PROVIDERS,
    bench_device,
    pick_dtype,
    pick_shape,
    provider_fn,
    run_benchmark,
)

from convrec.ops import conv_pool
from convrec.schedule import out_length

# name: (B, L, D, heads, kernel, stride, mask-aware)
CASES = {
    "D64-k2": (256, 512, 64, 1, 2, 2, False),
    "D256-k2": (128, 512, 256, 1, 2, 2, False),
    "D256-H4-k7-masked": (128, 512, 256, 4, 7, 7, True),
    "D64-L4096-k8": (32, 4096, 64, 1, 8, 8, False),
}
TINY = (2, 20, 8, 1, 2, 2, True)


def cost(batch, length, width, heads, kernel, stride, elem_bytes, mode) -> dict[str, float]:
    """Compulsory bytes and FLOPs of one call (see the module docstring)."""
    windows, head_dim = out_length(length, kernel, stride), width // heads
    flops = 2 * batch * windows * width * kernel * (head_dim + 2)
    moved = elem_bytes * (2 * batch * length * width + 3 * batch * windows * width)
    moved += elem_bytes * width * head_dim * kernel + 4 * batch * windows
    if mode == "fwd+bwd":
        flops += 4 * batch * windows * width * head_dim * kernel
        moved += elem_bytes * (3 * batch * windows * width + 3 * batch * length * width)
    return {"bytes": moved, "flops": flops}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_conv_pool(benchmark, case: str, dtype_name: str, provider: str, mode: str) -> None:
    device = bench_device()
    dtype = pick_dtype(dtype_name)
    shape = pick_shape(CASES, case, TINY, device)
    batch, length, width, heads, kernel, stride, mask_aware = shape
    x = torch.randn(batch, length, width, device=device, dtype=dtype, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    weight = torch.randn(width, width // heads, kernel, device=device, dtype=dtype)
    weight = (weight / kernel**0.5).requires_grad_()
    bias = torch.randn(width, device=device, dtype=dtype, requires_grad=True)
    mask = torch.rand(batch, length, device=device) > 0.2 if mask_aware else None
    benchmark.group = f"conv_pool {case} {dtype_name} {mode}"
    run_benchmark(
        benchmark,
        provider_fn(provider, conv_pool),
        (x, residual, weight, bias, stride, heads, mask),
        (x, residual, weight, bias),
        mode,
        cost(batch, length, width, heads, kernel, stride, x.element_size(), mode),
    )
