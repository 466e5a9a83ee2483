"""Fixed launch configurations shared by the kernels.

The interpreter (``TRITON_INTERPRET=1``) pays per program instance and per instruction, so it
gets few, large tiles; a GPU gets tiles sized for registers and occupancy. There is no
multi-config autotuning: it cannot run under the interpreter, and fixed tiles keep CPU tests and
GPU runs on the same code path.
"""

from __future__ import annotations

import os

import torch
import triton

# Most windows (rows) one tile of the conv kernels covers.
_GPU_ROWS = 32
_INTERPRETER_ROWS = 128
# Channel tile of the conv kernels (a head is split into tiles of this width).
_GPU_CHANNELS = 64
_INTERPRETER_CHANNELS = 128
# Rows and channels of one gather / scatter tile.
_GPU_GATHER = (32, 128)
_INTERPRETER_GATHER = (256, 256)
# Whole-stack kernels (triton/downscale.py): windows per tile, warps and software-pipelining
# stages. One program per batch row, so occupancy does not matter and registers do: 16 x 64
# tiles with 8 warps and no pipelining compile without register spills for sm_90 (ptxas report
# of benchmarks/triton_resources.py), where 32-window tiles or 4 warps spill kilobytes.
_GPU_STACK = {"windows": 16, "num_warps": 8, "num_stages": 1}
_INTERPRETER_STACK = {"windows": 128, "num_warps": 4, "num_stages": 1}
# Chunks of a batch row's leading kernel == stride levels: programs in all per SM, and the
# fewest input positions a chunk covers (a program walks its chunk's levels one after another,
# so short histories stay one program per row). The interpreter splits short rows, for tests.
_GPU_CHUNK_PROGRAMS_PER_SM, _GPU_CHUNK_POSITIONS = 4, 1024
_INTERPRETER_CHUNKS = (6, 8)
# Cap on the fp32 elements of the per-program weight-gradient partials (64 MiB).
_PARTIAL_BUDGET = 1 << 24
# Programs per streaming multiprocessor the weight-gradient grid aims for.
_PROGRAMS_PER_SM = 4


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def row_block(rows: int) -> int:
    """Rows of one conv tile: a power of two >= 16 (the smallest ``tl.dot`` operand)."""
    cap = _INTERPRETER_ROWS if interpreting() else _GPU_ROWS
    return max(16, min(cap, triton.next_power_of_2(rows)))


def channel_block(head_dim: int) -> int:
    """Channels of one conv tile: a power of two >= 16 covering the head when it fits."""
    cap = _INTERPRETER_CHANNELS if interpreting() else _GPU_CHANNELS
    return max(16, min(cap, triton.next_power_of_2(head_dim)))


def gather_blocks(rows: int, width: int) -> tuple[int, int]:
    """(rows, channels) of one gather/scatter tile."""
    max_rows, max_cols = _INTERPRETER_GATHER if interpreting() else _GPU_GATHER
    return (
        max(1, min(max_rows, triton.next_power_of_2(rows))),
        max(1, min(max_cols, triton.next_power_of_2(width))),
    )


def stack_launch() -> dict[str, int]:
    """Tile height ("windows"), num_warps and num_stages of the whole-stack kernels."""
    return dict(_INTERPRETER_STACK if interpreting() else _GPU_STACK)


def stack_chunks(device: torch.device) -> tuple[int, int]:
    """(programs to aim for in all, fewest input positions per chunk) of the whole-stack
    kernels (``triton/downscale.py``, ``chunking``)."""
    if interpreting() or device.type != "cuda":
        return _INTERPRETER_CHUNKS
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return _GPU_CHUNK_PROGRAMS_PER_SM * sms, _GPU_CHUNK_POSITIONS


def partial_programs(
    tiles: int, partial_size: int, tile_programs: int, device: torch.device
) -> int:
    """How many ways the weight-gradient reduction is split, each way writing one fp32 partial
    of ``partial_size`` elements; ``tile_programs`` programs already run per way.

    Enough programs in all to fill the GPU, but few partials: their traffic grows with the
    count. One or two when interpreting.
    """
    if interpreting():
        cap = 2
    elif device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        cap = max(1, _PROGRAMS_PER_SM * sms // tile_programs)
    else:
        cap = 8
    return max(1, min(tiles, cap, _PARTIAL_BUDGET // max(1, partial_size)))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32/fp64 operands use exact products (as the reference does), not TF32; fp16/bf16
    operands go to the tensor cores whatever this says."""
    return "tf32" if dtype in (torch.float16, torch.bfloat16) else "ieee"
