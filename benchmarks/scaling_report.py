"""Log-log plots with fitted slopes and the Markdown report of a scaling sweep.

matplotlib is an optional dependency (the ``bench`` extra), imported only when plotting.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import numpy as np

from benchmarks.scaling_settings import Settings, series_label
from benchmarks.scaling_worker import ATTENTIONS
from convrec.schedule import schedule_for_length

FLOOR_FACTOR = 10  # a point is past the fixed-overhead floor at >= 10x the series' minimum
MIN_FIT_POINTS = 3
TIME_METRICS = {
    "forward_s": "forward (autograd on)",
    "train_step_s": "training step (forward + backward)",
    "topk_s": "top-k over all items",
}
MEMORY_METRICS = {
    "saved_bytes": "saved for backward",
    "train_peak_bytes": "peak, training step",
    "topk_peak_bytes": "peak, top-k",
}
MIB = 2**20


def check_plotting() -> None:
    """Fail early, with the fix, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(
            "the scaling plots need matplotlib: pip install matplotlib (or 'convrec[bench]')"
        ) from None


@dataclasses.dataclass(frozen=True)
class Fit:
    """Least-squares slope of log(value) against log(L) over ``low``..``high``."""

    slope: float
    low: int
    high: int
    intercept: float


def fit_slope(points: Sequence[tuple[int, float]]) -> Fit | None:
    """The slope over the lengths where a curve has left its fixed-overhead floor.

    The floor is the curve's smallest value; the fit starts at the first L whose value is at
    least ``FLOOR_FACTOR`` times it (or at the ``MIN_FIT_POINTS``-th largest L when fewer
    points qualify) and runs to the largest L. None with fewer than two positive points.
    """
    points = sorted((n, v) for n, v in points if v > 0)
    if len(points) < 2:
        return None
    floor = min(v for _, v in points)
    start = next((i for i, (_, v) in enumerate(points) if v >= FLOOR_FACTOR * floor), None)
    if start is None or len(points) - start < MIN_FIT_POINTS:
        start = max(0, len(points) - MIN_FIT_POINTS)
    used = points[start:]
    slope, intercept = np.polyfit(np.log([n for n, _ in used]), np.log([v for _, v in used]), 1)
    return Fit(float(slope), used[0][0], used[-1][0], float(intercept))


def _ok(rows: list[dict], **where: object) -> list[dict]:
    return [r for r in rows if r["status"] == "ok" and all(r[k] == v for k, v in where.items())]


def _present(rows: list[dict], scope: str, names: Sequence[str]) -> list[str]:
    """The metrics among ``names`` that the scope has rows for, in the order of ``names``."""
    have = {r["metric"] for r in rows if r["scope"] == scope}
    return [m for m in names if m in have]


def _labels(rows: list[dict], scope: str) -> list[tuple[str, str, str]]:
    """(label, model, backend) of the scope's series, in sweep order."""
    seen = dict.fromkeys((r["model"], r["backend"]) for r in rows if r["scope"] == scope)
    return [(series_label(scope, m, b), m, b) for m, b in seen]


def _curve(rows: list[dict], scope: str, model: str, backend: str, metric: str) -> list:
    """(L, value) of the ok measurements of one series and metric, positive values only."""
    found = _ok(rows, scope=scope, model=model, backend=backend, metric=metric)
    return [(r["L"], float(r["value"])) for r in found if float(r["value"]) > 0]


def _plot(
    rows: list[dict], scope: str, titles: dict[str, str], path: pathlib.Path, unit: str
) -> dict[tuple[str, str], Fit]:
    """One log-log panel per metric, one line per series; returns the fits."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    present = _present(rows, scope, list(titles))
    fig, axes = plt.subplots(1, len(present), figsize=(6 * len(present), 4.8), squeeze=False)
    fits = {}
    scale = MIB if unit == "MiB" else 1.0
    lengths = sorted({r["L"] for r in rows})
    for ax, metric in zip(axes[0], present, strict=True):
        for label, model, backend in _labels(rows, scope):
            points = _curve(rows, scope, model, backend, metric)
            if not points:
                continue
            fit = fit_slope(points)
            text = label
            if fit is not None:
                fits[label, metric] = fit
                text += f": slope {fit.slope:.2f} (L {fit.low}-{fit.high})"
            xs, ys = zip(*points, strict=True)
            (line,) = ax.plot(xs, [y / scale for y in ys], marker="o", label=text)
            if fit is not None:
                span = np.array([fit.low, fit.high], dtype=float)
                ax.plot(
                    span,
                    np.exp(fit.intercept) * span**fit.slope / scale,
                    linestyle="--",
                    linewidth=1,
                    color=line.get_color(),
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(lengths, [str(n) for n in lengths], rotation=45)
        ax.minorticks_off()
        ax.set_xlabel("history length L")
        ax.set_ylabel("seconds" if unit == "s" else unit)
        ax.set_title(titles[metric])
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fits


def _value(rows: list[dict], scope: str, model: str, backend: str, length: int, metric: str):
    found = [
        r
        for r in rows
        if (r["scope"], r["model"], r["backend"], r["L"], r["metric"])
        == (scope, model, backend, length, metric)
    ]
    return found[0] if found else None


def _cell(row: dict | None) -> str:
    """A measurement for the results table: time in ms (min..max), bytes in MiB, or status."""
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    if row["unit"] == "s":
        return f"{1e3 * row['value']:.3g} ({1e3 * row['low']:.3g}..{1e3 * row['high']:.3g})"
    return f"{row['value'] / MIB:.3g}"


def _ratio(conv: dict | None, attention: dict | None) -> str:
    """ConvRec / attention with the factor it saves, "0.048 (21x)", or why there is none."""
    for row in (conv, attention):
        if row is None:
            return "-"
        if row["status"] != "ok":
            return row["status"]
    if attention["value"] <= 0 or conv["value"] <= 0:
        return "-"
    ratio = conv["value"] / attention["value"]
    return f"{ratio:.3g} ({1 / ratio:.3g}x)"


RATIO_METRICS = {
    "train_step_s": "train step",
    "topk_s": "top-k",
    "saved_bytes": "saved",
    "train_peak_bytes": "train peak",
}


def _ratio_tables(rows: list[dict], scope: str) -> list[str]:
    """Per ConvRec backend with results: ConvRec / SASRec-sdpa and / SASRec-naive at each L."""
    lines = []
    metrics = _present(rows, scope, list(RATIO_METRICS))
    for _, model, backend in _labels(rows, scope):
        if model != "ConvRec" or not _ok(rows, scope=scope, model=model, backend=backend):
            continue
        label = series_label(scope, model, backend)
        lines += [
            "",
            f"**{label}** divided by the attention baseline (below 1: ConvRec is cheaper; in "
            "brackets the factor saved)",
            "",
            "| L | "
            + " | ".join(f"{RATIO_METRICS[m]} ÷ {a}" for m in metrics for a in ATTENTIONS)
            + " |",
            "|---:" * (1 + 2 * len(metrics)) + "|",
        ]
        for length in sorted({r["L"] for r in rows}):
            cells = [
                _ratio(
                    _value(rows, scope, model, backend, length, m),
                    _value(rows, scope, "SASRec", attention, length, m),
                )
                for m in metrics
                for attention in ATTENTIONS
            ]
            lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return lines


def _results_table(rows: list[dict], scope: str) -> list[str]:
    names = {m: f"{t} ms" for m, t in TIME_METRICS.items()}
    names |= {m: f"{t} MiB" for m, t in MEMORY_METRICS.items()}
    metrics = _present(rows, scope, list(names))
    lines = [
        "",
        "| series | L | " + " | ".join(names[m] for m in metrics) + " |",
        "|---|---:" + "|---:" * len(metrics) + "|",
    ]
    for label, model, backend in _labels(rows, scope):
        for length in sorted({r["L"] for r in rows}):
            cells = [_cell(_value(rows, scope, model, backend, length, m)) for m in metrics]
            if any(c not in ("", "skipped", "unavailable") for c in cells):
                lines.append(f"| {label} | {length} | " + " | ".join(cells) + " |")
    return lines


def _not_measured(rows: list[dict]) -> list[str]:
    """One line per series and reason it was not measured, with the lengths it applies to."""
    lengths: dict[tuple[str, str, str], list[int]] = {}
    for r in rows:
        if r["status"] != "ok":
            key = (series_label(r["scope"], r["model"], r["backend"]), r["status"], r["detail"])
            if r["L"] not in lengths.setdefault(key, []):
                lengths[key].append(r["L"])
    if not lengths:
        return ["", "Every configuration was measured."]
    lines = ["", "| series | L | status | why |", "|---|---|---|---|"]
    for (label, status, why), found in lengths.items():
        lines.append(
            f"| {label} | {' '.join(map(str, found))} | {status} | {why.replace('|', '/')} |"
        )
    return lines


def _method(settings: Settings, rows: list[dict]) -> list[str]:
    lengths = sorted({r["L"] for r in rows})
    levels = ", ".join(
        f"{n}: {' '.join(f'{k}/{s}' for k, s in schedule_for_length(n))}" for n in lengths
    )
    if settings.device == "cuda":
        memory = (
            "`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus "
            "`memory_allocated` before the call"
        )
    elif settings.in_process:
        memory = (
            "peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the resident "
            "set before the call, after `malloc_trim(0)`, all configurations in one process "
            "(`--in-process`): rough, allocator state carries over between configurations"
        )
    else:
        memory = (
            "peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the resident "
            "set before the call, after `malloc_trim(0)` returned the free heap pages to the "
            "OS, in a fresh process per configuration; page-granular, includes allocator "
            "overhead"
        )
    return [
        "## What is measured",
        "",
        f"- Batch B={settings.batch_size} of random full-length histories (no padding), width "
        f"D={settings.d_model}, synthetic catalogue of {settings.num_items} items (item rows "
        "only, no attributes), float32, dropout on in training mode.",
        "- Scope `model`: `ConvRec` (heads 1, dropout 0.1, levels kernel/stride from "
        "`schedule_for_length(L)`, max kernel 8) against `SASRec` (2 pre-LN blocks, 2 heads, "
        "dropout 0.2) with `F.scaled_dot_product_attention` (`sdpa`) and with materialised "
        "(B, heads, L, L) scores (`naive`); the same `ItemEncoder`. ConvRec levels per L: "
        f"{levels}.",
        "- Scope `encoder`: `ConvRecEncoder.for_length(L)` against SASRec's "
        "`TransformerEncoder` on random (B, L, D) inputs, loss = mean of squared outputs.",
        "- forward: the training-mode forward of the loss with autograd recording; the model "
        "loss is the full-softmax cross-entropy over all items.",
        "- training step: forward + backward of that loss (all parameter gradients), no "
        "optimiser step.",
        f"- top-k: `recommend(ids, k={settings.top_k})` in eval mode without autograd, scoring "
        "every item, no exclusion of seen items.",
        "- saved for backward: bytes of the distinct storages autograd saves during the "
        "forward (`saved_tensors_hooks`), parameters, buffers and inputs excluded: exact and "
        "machine-independent.",
        f"- peak memory (first call of the phase): {memory}.",
        f"- times: median of up to {settings.repeats} timed calls after one untimed first call "
        "(which counts as a timed call when it takes >= 1 s: one-time costs are then "
        "negligible), (min..max) in the tables; fewer repeats when they would take more than "
        f"half of the configuration's budget of {settings.budget_s:g} s (count in the CSV "
        "column `repeats`).",
        f"- limits: a series stops after its first out-of-memory or timeout; materialised "
        f"attention is skipped once one block's scores would exceed "
        f"{settings.memory_cap_bytes / 2**30:.1f} GiB; a configuration predicted to exceed "
        "the budget (one call per phase, extrapolated at a log-log slope of 1 to 2) is "
        "skipped.",
        f"- slopes: least squares of log(value) on log(L) over the lengths where the curve is "
        f"at least {FLOOR_FACTOR}x its smallest value (its fixed-overhead floor), or the "
        f"{MIN_FIT_POINTS} largest lengths when fewer qualify; the range is given with each.",
    ]


def _slopes_table(rows: list[dict], scope: str, fits: dict[tuple[str, str], Fit]) -> list[str]:
    """Series x metric: fitted slope with the L range it was fitted over."""
    names = {**TIME_METRICS, **MEMORY_METRICS}
    metrics = _present(rows, scope, list(names))
    lines = [
        "",
        "| series | " + " | ".join(names[m] for m in metrics) + " |",
        "|---" + "|---:" * len(metrics) + "|",
    ]
    for label, _, _ in _labels(rows, scope):
        cells = [fits.get((label, m)) for m in metrics]
        if any(cells):
            text = [f"{f.slope:.2f} (L {f.low}-{f.high})" if f else "" for f in cells]
            lines.append(f"| {label} | " + " | ".join(text) + " |")
    return lines


def write_report(
    rows: list[dict], settings: Settings, out: pathlib.Path, wall_s: float
) -> pathlib.Path:
    """Plots per scope, then ``scaling.md`` embedding them; returns the report's path."""
    machine = rows[0]
    gpu = f"GPU {machine['gpu']}, host " if settings.device == "cuda" else ""
    lines = [
        f"# Scaling: ConvRec against attention on {settings.device}",
        "",
        f"- device: {gpu}CPU {machine['cpu']}, {machine['threads']} torch threads / logical CPUs",
        f"- torch {machine['torch']}, triton {machine['triton']}",
        f"- command: `{settings.command()}` ({wall_s / 60:.1f} min)",
        "- raw numbers: `scaling.csv` (one row per scope, model, backend, device, L, metric)",
        "",
        *_method(settings, rows),
    ]
    for scope in dict.fromkeys(r["scope"] for r in rows):
        figures, fits = [], {}
        for kind, titles, unit in (("time", TIME_METRICS, "s"), ("memory", MEMORY_METRICS, "MiB")):
            name = f"{kind}_{scope}.png"
            fits |= _plot(rows, scope, titles, out / name, unit)
            figures.append(f"![{kind}, scope {scope}]({name})")
        lines += [
            "",
            f"## Scope `{scope}`",
            "",
            *figures,
            "",
            "### Fitted log-log slopes (1: linear in L, 2: quadratic)",
            *_slopes_table(rows, scope, fits),
            "",
            "### ConvRec / attention",
            *_ratio_tables(rows, scope),
            "",
            "### Results (time median (min..max) in ms, memory in MiB)",
            *_results_table(rows, scope),
        ]
    lines += ["", "## Not measured", *_not_measured(rows), ""]
    path = out / "scaling.md"
    path.write_text("\n".join(lines))
    return path
