"""The fused ``embed_conv_pool`` (gather fused into level 1): shapes, inputs, cost.

The reference and compiled providers are ``gather_embed`` then ``conv_pool``, which store the
(B, L, D) embeddings.

Arithmetic intensity, per position, k = s, a attributes per item, b bytes per element,
Dh = D / H: FLOPs = D (a + 3) (gather) + 2 D (Dh + 2) (conv and pool); compulsory bytes =
b D (1 + a) (rows read; the embeddings are never written) + b 2 D / k (conv and pooled outputs)
+ 8 (a + 3) (ids and CSR), so AI ~ 2 (Dh + 2) / (b (1 + a + 2 / k)).
a = 3, k = 2: D = 64, H = 1: 13.2 FLOP/B in bf16, 6.6 in fp32; D = 256, H = 1: 51.6 bf16,
25.8 fp32. Against the H200 ridge points (bf16 tensor cores 230 FLOP/B, fp32 CUDA cores 15.6)
bf16 is memory-bound (judge GB/s against 4.3 TB/s); fp32 with one wide head is compute-bound
on the CUDA cores, since the kernel keeps exact fp32 products.
Backward: 4 B L D Dh FLOPs; it recomputes the gather (b D (1 + a)) and scatters fp32 table
gradients (read-modify-write, 8 D (1 + a)) per position.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from benchmarks.ops.gather_embed import catalogue, histories
from benchmarks.ops.spec import Inputs, OpBench
from convrec.ops import embed_conv_pool
from convrec.ops.item_tables import ItemTables
from convrec.schedule import out_length


class Shape(NamedTuple):
    batch: int
    length: int
    width: int
    heads: int
    kernel: int
    stride: int
    mask_aware: bool
    items: int
    attributes: int
    per_item: int


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype) -> Inputs:
    """Padded histories, random tables and catalogue, a scaled random level-1 conv."""
    batch, length, width, heads, kernel, stride, mask_aware, items, attrs, per_item = shape
    ids = histories(batch, length, items, device)
    offsets, attr_ids = catalogue(items, attrs, per_item, device)

    def param(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, device=device, dtype=dtype) * scale).requires_grad_()

    item_table, attr_table = param(items + 1, width), param(attrs, width)
    weight = param(width, width // heads, kernel, scale=kernel**-0.5)
    bias = param(width)
    tables = ItemTables(item_table, offsets, attr_ids, attr_table)
    args = (ids, tables, weight, bias, stride, heads)
    return Inputs(
        args=(*args, ids != 0, mask_aware), parameters=(item_table, attr_table, weight, bias)
    )


def cost(shape: Shape, elem_bytes: int, mode: str) -> dict[str, float]:
    """Compulsory bytes and FLOPs of one call (see the module docstring)."""
    batch, length, width, heads, kernel, stride, _, _, _, per_item = shape
    positions, windows = batch * length, batch * out_length(length, kernel, stride)
    head_dim = width // heads
    flops = positions * width * (per_item + 3) + 2 * windows * width * kernel * (head_dim + 2)
    moved = positions * (elem_bytes * width * (1 + per_item) + 8 * (per_item + 3))
    moved += elem_bytes * 2 * windows * width + 4 * windows
    if mode == "fwd+bwd":
        flops += 4 * windows * width * head_dim * kernel
        moved += positions * (elem_bytes + 8) * width * (1 + per_item)
        moved += elem_bytes * 2 * windows * width
    return {"bytes": moved, "flops": flops}


BENCH = OpBench(
    name="embed_conv_pool",
    op=embed_conv_pool,
    shapes={
        "D64-k2-a3": Shape(256, 512, 64, 1, 2, 2, False, 100_000, 1_000, 3),
        "D256-k2-a3": Shape(128, 512, 256, 1, 2, 2, False, 100_000, 1_000, 3),
        "D256-H4-k7-a3-masked": Shape(128, 512, 256, 4, 7, 7, True, 100_000, 1_000, 3),
    },
    tiny=Shape(2, 20, 8, 1, 2, 2, True, 50, 10, 3),
    make_inputs=make_inputs,
    cost=cost,
    providers=("reference", "compiled", "triton"),
)
