"""``conv_pool`` (one level: strided grouped conv + two average pools): shapes, inputs, cost.

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

from typing import NamedTuple

import torch

from benchmarks.ops.spec import Inputs, OpBench
from convrec.ops import conv_pool
from convrec.schedule import out_length


class Shape(NamedTuple):
    batch: int
    length: int
    width: int
    heads: int
    kernel: int
    stride: int
    mask_aware: bool


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype) -> Inputs:
    """Random x and residual, a scaled random weight, bias; a random padding mask if masked."""
    batch, length, width, heads, kernel, stride, mask_aware = shape
    x = torch.randn(batch, length, width, device=device, dtype=dtype, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    weight = torch.randn(width, width // heads, kernel, device=device, dtype=dtype)
    weight = (weight / kernel**0.5).requires_grad_()
    bias = torch.randn(width, device=device, dtype=dtype, requires_grad=True)
    mask = torch.rand(batch, length, device=device) > 0.2 if mask_aware else None
    return Inputs(
        args=(x, residual, weight, bias, stride, heads, mask),
        grad_inputs=(x, residual),
        parameters=(weight, bias),
    )


def cost(shape: Shape, elem_bytes: int, mode: str) -> dict[str, float]:
    """Compulsory bytes and FLOPs of one call (see the module docstring)."""
    batch, length, width, heads, kernel, stride, _ = shape
    windows, head_dim = out_length(length, kernel, stride), width // heads
    flops = 2 * batch * windows * width * kernel * (head_dim + 2)
    moved = elem_bytes * (2 * batch * length * width + 3 * batch * windows * width)
    moved += elem_bytes * width * head_dim * kernel + 4 * batch * windows
    if mode == "fwd+bwd":
        flops += 4 * batch * windows * width * head_dim * kernel
        moved += elem_bytes * (3 * batch * windows * width + 3 * batch * length * width)
    return {"bytes": moved, "flops": flops}


BENCH = OpBench(
    name="conv_pool",
    op=conv_pool,
    shapes={
        "D64-k2": Shape(256, 512, 64, 1, 2, 2, False),
        "D256-k2": Shape(128, 512, 256, 1, 2, 2, False),
        "D256-H4-k7-masked": Shape(128, 512, 256, 4, 7, 7, True),
        "D64-L4096-k8": Shape(32, 4096, 64, 1, 8, 8, False),
    },
    tiny=Shape(2, 20, 8, 1, 2, 2, True),
    make_inputs=make_inputs,
    cost=cost,
    providers=("reference", "compiled", "triton"),
)
