"""Compile the whole-stack Triton kernels (``convrec/ops/triton/downscale.py``) for a GPU
architecture on a machine without a GPU, and report each kernel's registers and spills (Triton's
own ptxas, ``-v``). A kernel with one program per batch row lives or dies by its registers:
spills go to local memory on every tile. Used to pick the launch configuration in
``convrec/ops/triton/launch.py``; ``tests/test_triton_compile.py`` compiles the same kernels.

    python -m benchmarks.triton_resources [--arch 90] [--out benchmarks/results]

Writes ``triton_resources.{csv,md}``. Compiled by the installed Triton, which need not be the
GPU machine's version: the numbers describe this compiler, not a measurement on a GPU.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import pathlib
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from convrec.ops.triton import downscale
from convrec.ops.triton.launch import _GPU_STACK

ACC = {"bf16": "fp32", "fp16": "fp32", "fp32": "fp32", "fp64": "fp64"}
POINTERS_IN_X_DTYPE = ("x_ptr", "res_ptr", "params_ptr", "user_ptr", "g_user_ptr", "gx_ptr",
                       "gres_ptr", "grad_ptr")  # fmt: skip
POINTERS_IN_ACC_DTYPE = ("fold_ptr", "ws_ptr", "gws_ptr", "part_ptr", "grad_sum_ptr", "out_ptr")
FLOATS = ("scale_hi", "scale_lo", "eps_hi", "eps_lo")
ROW_SIZES = ("ws_row", "gws_row", "part_row")


def kernel_signature(kernel, dtype: str, constants: dict) -> dict[str, str]:
    """Triton's signature of ``kernel`` for inputs of ``dtype``, ``constants`` as constexprs."""
    types = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constants:
            types[name] = "constexpr"
        elif name in POINTERS_IN_X_DTYPE:
            types[name] = f"*{dtype}"
        elif name in POINTERS_IN_ACC_DTYPE:
            types[name] = f"*{ACC[dtype]}"
        elif name in ("plan_ptr", "seed_ptr"):
            types[name] = "*i64"
        elif name == "mask_ptr":
            types[name] = "*u8"
        elif name in FLOATS:
            types[name] = "fp32"
        elif name in ROW_SIZES:
            types[name] = "i64"
        else:
            types[name] = "i32"
    return types


def compile_whole_stack(dtype: str, arch: int = 90, d: int = 64) -> dict[str, object]:
    """Every whole-stack kernel compiled for ``arch`` with the GPU launch configuration and
    every feature on (mask, mask-aware pools, residual input, dropout)."""
    launch = dict(_GPU_STACK)
    block_d = max(16, triton.next_power_of_2(d))
    flags = {
        "BLOCK_W": launch["windows"],
        "BLOCK_D": block_d,
        "HAS_MASK": True,
        "HAS_RES": True,
        "MASK_AWARE": True,
        "DROPOUT": True,
        "HALF_DOT": dtype in ("bf16", "fp16"),
        "PRECISION": "ieee",
    }
    kernels = {
        "_stack_forward": flags,
        "_stack_backward": flags,
        "_fold_levels": {"BLOCK_D": block_d},
        "_unfold_levels": {"BLOCK_D": block_d},
        "_sum_partials": {"BLOCK": 1024},
    }
    options = {"num_warps": launch["num_warps"], "num_stages": launch["num_stages"]}
    target = GPUTarget("cuda", arch, 32)
    compiled = {}
    for name, constants in kernels.items():
        kernel = getattr(downscale, name)
        signature = kernel_signature(kernel, dtype, constants)
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
        compiled[name] = triton.compile(source, target=target, options=options)
    return compiled


def ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill store bytes) of one kernel's PTX, from Triton's ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        command = [get_ptxas(arch).path, f"-arch=sm_{arch}a", "-v", source.name, "-o", "/dev/null"]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", text).group(1))
    return registers, spills


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    args = parser.parse_args(argv)
    rows = []
    for dtype in ("bf16", "fp32"):
        for name, kernel in compile_whole_stack(dtype, args.arch).items():
            registers, spills = ptxas_report(kernel.asm["ptx"], args.arch)
            shared = kernel.metadata.shared
            rows.append(dict(kernel=name, dtype=dtype, registers=registers, spill_bytes=spills,
                             shared_bytes=shared))  # fmt: skip
            print(rows[-1])
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "triton_resources.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m benchmarks.triton_resources", *given])
    lines = [
        "# Whole-stack Triton kernels: registers and spills (compiled, not run)",
        "",
        f"`{command}`: Triton {triton.__version__} compiling for sm_{args.arch} on a "
        f"machine without a GPU; launch configuration {_GPU_STACK}, D = 64, every feature on.",
        "",
        "| kernel | dtype | registers | spill stores (bytes) | shared memory (bytes) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['kernel']} | {r['dtype']} | {r['registers']} | {r['spill_bytes']} | "
        f"{r['shared_bytes']} |"
        for r in rows
    ]
    (args.out / "triton_resources.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
