"""Microbenchmarks of ``gather_embed`` (item row + mean attribute row per position).

Run: ``pytest benchmarks/bench_gather_embed.py`` on a CUDA machine (skips without one;
``CONVREC_BENCH_INTERPRET=1`` runs a tiny shape in the Triton interpreter).

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

from convrec.ops import gather_embed

# name: (B, L, D, items, attributes, attributes per item)
CASES = {
    "B256-L512-D64-a3": (256, 512, 64, 100_000, 1_000, 3),
    "B128-L512-D256-a3": (128, 512, 256, 100_000, 1_000, 3),
    "B128-L512-D256-a0": (128, 512, 256, 100_000, 0, 0),
}
TINY = (2, 20, 8, 50, 10, 3)


def catalogue(items: int, attrs: int, per_item: int, device: torch.device):
    """CSR with exactly ``per_item`` random attributes per item (row 0, padding, has none)."""
    counts = torch.full((items + 1,), per_item, dtype=torch.int64)
    counts[0] = 0
    offsets = torch.zeros(items + 2, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    ids = torch.randint(0, attrs, (int(offsets[-1]),))
    return offsets.to(device), ids.to(device)


def cost(batch, length, width, per_item, elem_bytes, mode) -> dict[str, float]:
    """Compulsory bytes and FLOPs of one call (see the module docstring)."""
    positions = batch * length
    flops = positions * width * (per_item + 3)
    moved = positions * (elem_bytes * width * (per_item + 2) + 8 * (per_item + 3))
    if mode == "fwd+bwd":
        flops += positions * width * (per_item + 1)
        moved += positions * (elem_bytes * width + 2 * 4 * width * (per_item + 1))
    return {"bytes": moved, "flops": flops}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_gather_embed(benchmark, case: str, dtype_name: str, provider: str, mode: str) -> None:
    device = bench_device()
    dtype = pick_dtype(dtype_name)
    batch, length, width, items, attrs, per_item = pick_shape(CASES, case, TINY, device)
    ids = torch.randint(1, items + 1, (batch, length), device=device)
    ids[:, : length // 4] = 0  # left padding
    item_table = torch.randn(items + 1, width, device=device, dtype=dtype, requires_grad=True)
    if per_item:
        offsets, attr_ids = catalogue(items, attrs, per_item, device)
        attr_table = torch.randn(attrs, width, device=device, dtype=dtype, requires_grad=True)
        tables = (item_table, offsets, attr_ids, attr_table)
        wrt = (item_table, attr_table)
    else:
        tables, wrt = (item_table, None, None, None), (item_table,)
    benchmark.group = f"gather_embed {case} {dtype_name} {mode}"
    run_benchmark(
        benchmark,
        provider_fn(provider, gather_embed),
        (ids, *tables, ids != 0),
        wrt,
        mode,
        cost(batch, length, width, per_item, item_table.element_size(), mode),
    )
