"""``gather_embed`` (item row + mean attribute row per position): shapes, inputs, cost.

Arithmetic intensity, per position, with a attributes per item and b bytes per element:
FLOPs = D (a + 3) (attribute sum, divide, item add, mask); compulsory bytes = b D (a + 2) (the
item row and a attribute rows read, one row written) + 8 (a + 3) (id, two CSR offsets, attribute
ids), counting each gathered row once per occurrence (rows reused from L2 make it cheaper).
AI ~ (a + 3) / (b (a + 2)): 0.3 FLOP/B in fp32, 0.6 in bf16, far below every H200 ridge point
(15.6 FLOP/B for fp32 CUDA cores): memory-bound, judge it in GB/s against 4.3 TB/s.
The backward scatters b D (a + 1) per position into fp32 table gradients (read-modify-write)
plus the dense zeroing and cast of both gradient tables.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from benchmarks.ops.spec import Inputs, OpBench
from convrec.ops import gather_embed
from convrec.ops.item_tables import ItemTables


class Shape(NamedTuple):
    batch: int
    length: int
    width: int
    items: int
    attributes: int
    per_item: int  # attributes per item (0: no attribute table)


def catalogue(
    items: int, attributes: int, per_item: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR (offsets, attribute ids) with exactly ``per_item`` random attributes per item (row
    0, padding, has none)."""
    counts = torch.full((items + 1,), per_item, dtype=torch.int64)
    counts[0] = 0
    offsets = torch.zeros(items + 2, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    ids = torch.randint(0, attributes, (int(offsets[-1]),))
    return offsets.to(device), ids.to(device)


def histories(batch: int, length: int, items: int, device: torch.device) -> torch.Tensor:
    """Random item ids with the first quarter of each history left-padded (id 0)."""
    ids = torch.randint(1, items + 1, (batch, length), device=device)
    ids[:, : length // 4] = 0
    return ids


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype) -> Inputs:
    """Padded histories, random item (and attribute) tables and a random catalogue."""
    batch, length, width, items, attributes, per_item = shape
    ids = histories(batch, length, items, device)
    item_table = torch.randn(items + 1, width, device=device, dtype=dtype, requires_grad=True)
    if per_item:
        offsets, attr_ids = catalogue(items, attributes, per_item, device)
        attr_table = torch.randn(attributes, width, device=device, dtype=dtype)
        attr_table.requires_grad_()
        tables = ItemTables(item_table, offsets, attr_ids, attr_table)
        parameters: tuple[torch.Tensor, ...] = (item_table, attr_table)
    else:
        tables, parameters = ItemTables(item_table), (item_table,)
    return Inputs(args=(ids, tables, ids != 0), parameters=parameters)


def cost(shape: Shape, elem_bytes: int, mode: str) -> dict[str, float]:
    """Compulsory bytes and FLOPs of one call (see the module docstring)."""
    batch, length, width, _, _, per_item = shape
    positions = batch * length
    flops = positions * width * (per_item + 3)
    moved = positions * (elem_bytes * width * (per_item + 2) + 8 * (per_item + 3))
    if mode == "fwd+bwd":
        flops += positions * width * (per_item + 1)
        moved += positions * (elem_bytes * width + 2 * 4 * width * (per_item + 1))
    return {"bytes": moved, "flops": flops}


BENCH = OpBench(
    name="gather_embed",
    op=gather_embed,
    shapes={
        "B256-L512-D64-a3": Shape(256, 512, 64, 100_000, 1_000, 3),
        "B128-L512-D256-a3": Shape(128, 512, 256, 100_000, 1_000, 3),
        "B128-L512-D256-a0": Shape(128, 512, 256, 100_000, 0, 0),
    },
    tiny=Shape(2, 20, 8, 50, 10, 3),
    make_inputs=make_inputs,
    cost=cost,
    providers=("reference", "compiled", "triton"),
)
