"""The whole ``downscale`` op (every level of ``ConvRecEncoder``): shapes and inputs.

One training step of the op alone, as ``ConvRecEncoder`` runs it: levels from
``schedule_for_length(L)``, dropout 0.1 in training mode, an all-real padding mask; fwd+bwd
takes the gradients of x and of every level parameter. Compared: the reference eager and under
``torch.compile`` (full graph, static shapes) and the convrec._C extension ("cpp" on CPU,
"cuda" on a GPU), so its CPU timings mean something too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from benchmarks.ops.spec import Inputs, OpBench
from convrec.encoder import ConvRecEncoder
from convrec.ops import downscale

DROPOUT = 0.1


class Shape(NamedTuple):
    batch: int
    length: int
    d_model: int


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype) -> Inputs:
    """Random x, all-real mask, and the level parameters of a seeded ``ConvRecEncoder``."""
    batch, length, d_model = shape
    torch.manual_seed(0)
    encoder = ConvRecEncoder.for_length(length, d_model, dropout=DROPOUT)
    encoder = encoder.to(device=device, dtype=dtype)
    x = torch.randn(batch, length, d_model, device=device, dtype=dtype, requires_grad=True)
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    params = encoder.level_params()
    strides = [s for _, s in encoder.levels]
    return Inputs(
        args=(x, params, strides, encoder.heads, mask),
        kwargs={"dropout": DROPOUT, "training": True},
        grad_inputs=(x,),
        parameters=(encoder.stack_weights,),
        info={"levels": " ".join(f"{k}/{s}" for k, s in encoder.levels)},
    )


BENCH = OpBench(
    name="downscale",
    op=downscale,
    shapes={
        "B64-L50-D64": Shape(64, 50, 64),
        "B64-L512-D64": Shape(64, 512, 64),
        "B64-L4096-D64": Shape(64, 4096, 64),
    },
    make_inputs=make_inputs,
    providers=("reference", "compiled", "cpp", "cuda"),
    dtypes=("fp32",),
    modes=("fwd+bwd",),
    gpu_only=False,
    rounds=(5, 2),
    outputs=lambda out: [out.user],
    compile_options={"fullgraph": True, "dynamic": False},
)
