"""The one registry of op benchmarks: op name -> ``OpBench`` (shapes, input factory, cost
model, providers compared).

``bench_ops.py`` (pytest-benchmark), ``downscale_table.py`` and the ``kernels`` summary read it;
none of them builds inputs of its own. Add an op by writing ``benchmarks/ops/<op>.py`` with a
``BENCH`` and listing it here.
"""

from __future__ import annotations

from benchmarks.ops import conv_pool, downscale, embed_conv_pool, gather_embed
from benchmarks.ops.spec import OpBench

REGISTRY: dict[str, OpBench] = {
    module.BENCH.name: module.BENCH
    for module in (gather_embed, conv_pool, embed_conv_pool, downscale)
}


def get(name: str) -> OpBench:
    """The op's benchmark; ``KeyError`` naming the known ops otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"no op benchmark {name!r}; known: {', '.join(REGISTRY)}") from None


def cases() -> list[tuple[str, str, str, str, str]]:
    """Every (op, shape name, dtype, provider, mode) the registry asks to time."""
    return [
        (bench.name, shape, dtype, provider, mode)
        for bench in REGISTRY.values()
        for shape in bench.shapes
        for dtype in bench.dtypes
        for provider in bench.providers
        for mode in bench.modes
    ]
