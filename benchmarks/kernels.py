"""Run the ops' pytest-benchmark groups and summarise them in Markdown.

``python -m benchmarks.kernels`` (from the repository root, ``--help``) runs
``benchmarks/bench_ops.py``, which times every case of ``benchmarks.registry``: one group per
"<op> <shape> <dtype> <mode>", one benchmark per provider ("reference" is the PyTorch reference
in eager mode, "compiled" the same under ``torch.compile``, then the fast paths). It writes the
pytest-benchmark JSON and turns it into a Markdown table of medians with the speedup of each
provider over the eager reference of the same group.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

from benchmarks.ops.spec import MODES, PROVIDERS

BENCH_FILE = pathlib.Path(__file__).resolve().with_name("bench_ops.py")
REPO_ROOT = BENCH_FILE.parents[1]
REFERENCE = "reference"
COMPILED = "compiled"
COPY_CEILING_BYTES_PER_S = 4.3e12  # device-to-device copy measured on the H200 (2026-11-30)


def run_benchmarks(json_path: pathlib.Path, select: str | None, interpret: bool) -> None:
    """``pytest benchmarks/bench_ops.py --benchmark-only --benchmark-json=json_path`` in the
    repository root (so ``benchmarks`` imports); raise ``SystemExit`` if nothing ran."""
    command = [
        sys.executable, "-m", "pytest", str(BENCH_FILE), "--benchmark-only",
        f"--benchmark-json={json_path.resolve()}", "-o", "python_files=bench_*.py", "-q",
        "-p", "no:cacheprovider",
    ]  # fmt: skip
    if select:
        command += ["-k", select]
    env = os.environ | ({"CONVREC_BENCH_INTERPRET": "1"} if interpret else {})
    code = subprocess.run(command, env=env, cwd=REPO_ROOT).returncode
    if code == 5:
        raise SystemExit(f"no benchmarks collected from {BENCH_FILE}")
    if code != 0:
        raise SystemExit(f"the benchmarks failed (pytest exit code {code}): see the output above")


def _split_group(group: str) -> tuple[str, str, str]:
    """ "conv_pool B32-L512 fp32 fwd" -> ("conv_pool", "B32-L512 fp32", "fwd"): the first word
    is the op, a word in ``MODES`` the mode, the rest the shape (any order after the op)."""
    op, *words = group.split()
    mode = next((w for w in words if w in MODES), "")
    return op, " ".join(w for w in words if w != mode), mode


def summarise(data: dict) -> list[dict]:
    """One row per benchmark: op, shape, mode, provider, median seconds, speedups over the
    eager and the compiled reference, and the bytes/FLOPs the benchmark recorded.

    The provider is the ``provider`` parameter (or ``extra_info["provider"]``). Other
    parameters that the group name does not already show (a dtype, say) join the shape, and
    the reference is looked up among benchmarks with the same group and parameters.
    """
    rows = []
    for bench in data.get("benchmarks", []):
        params = dict(bench.get("params") or {})
        group = bench.get("group") or bench["name"]
        provider = str(params.pop("provider", bench.get("extra_info", {}).get("provider", "?")))
        op, shape, mode = _split_group(group)
        extra = [str(v) for v in params.values() if str(v) not in group.split()]
        rows.append(
            {
                "key": (group, tuple(sorted((k, str(v)) for k, v in params.items()))),
                "op": op,
                "shape": " ".join([shape, *extra]).strip(),
                "mode": mode,
                "provider": provider,
                "median_s": bench["stats"]["median"],
                "rounds": bench["stats"]["rounds"],
                "bytes": bench.get("extra_info", {}).get("bytes"),
                "flops": bench.get("extra_info", {}).get("flops"),
            }
        )
    reference = {r["key"]: r["median_s"] for r in rows if r["provider"] == REFERENCE}
    compiled = {r["key"]: r["median_s"] for r in rows if r["provider"] == COMPILED}
    for r in rows:
        key = r.pop("key")
        for name, base in (("speedup", reference.get(key)), ("vs_compiled", compiled.get(key))):
            r[name] = None if base is None or r["median_s"] <= 0 else base / r["median_s"]
    rank = {p: i for i, p in enumerate(PROVIDERS)}
    rows.sort(key=lambda r: (r["op"], r["shape"], r["mode"], rank.get(r["provider"], 99)))
    return rows


def _duration(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def format_summary(rows: list[dict], data: dict) -> str:
    """Markdown: where it ran, then op | shape | mode | provider | median | speedup."""
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "unknown CPU"))
    lines = [
        f"Kernel microbenchmarks, {data.get('datetime', 'unknown date')}, {cpu}, "
        f"Python {machine.get('python_version', '?')}: median of the rounds; speedup = eager "
        "reference median / provider median, same group and parameters.",
        "",
    ]
    if not rows:
        return "\n".join([*lines, "No benchmark ran (without a GPU they skip; see the log)."])
    lines += [
        "GB/s = compulsory bytes / median (the % is of the 4.3 TB/s H200 copy ceiling, "
        "meaningful on that GPU only); TFLOP/s = counted FLOPs / median.",
        "",
        "| op | shape | mode | provider | median | rounds | vs eager | vs compiled "
        "| GB/s (% of 4.3 TB/s) | TFLOP/s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = {k: "" if r[k] is None else f"{r[k]:.2f}x" for k in ("speedup", "vs_compiled")}
        rate = flops = ""
        if r["bytes"] and r["median_s"] > 0:
            per_s = r["bytes"] / r["median_s"]
            rate = f"{per_s / 1e9:.1f} ({100 * per_s / COPY_CEILING_BYTES_PER_S:.0f} %)"
        if r["flops"] and r["median_s"] > 0:
            flops = f"{r['flops'] / r['median_s'] / 1e12:.3g}"
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['mode']} | {r['provider']} "
            f"| {_duration(r['median_s'])} | {r['rounds']} | {ratio['speedup']} "
            f"| {ratio['vs_compiled']} | {rate} | {flops} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    """Run the benchmarks (unless ``--from-json``), summarise them, write ``kernels.md``."""
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = pathlib.Path(args.from_json) if args.from_json else out / "kernels.json"
    if not args.from_json:
        run_benchmarks(json_path, args.select, args.interpret)
    data = json.loads(json_path.read_text())
    summary = format_summary(summarise(data), data)
    (out / "kernels.md").write_text(summary + "\n")
    print(summary)


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m benchmarks.kernels``."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.kernels",
        description="Runs benchmarks/bench_ops.py (every case of benchmarks.registry) with "
        "pytest-benchmark and writes a Markdown table of medians and speedups over the eager "
        "PyTorch reference.",
    )
    p.add_argument(
        "--out",
        default="benchmarks/results/kernels",
        help="folder for kernels.json and kernels.md (benchmarks/results/kernels)",
    )
    p.add_argument("-k", dest="select", help="pytest -k expression choosing benchmarks")
    p.add_argument(
        "--interpret",
        action="store_true",
        help="without a GPU: tiny shapes in Triton's CPU interpreter (checks the benchmarks "
        "themselves; timings meaningless)",
    )
    p.add_argument(
        "--from-json", help="summarise this pytest-benchmark JSON instead of running anything"
    )
    return p


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.kernels [flags]``."""
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
