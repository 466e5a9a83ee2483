"""Accuracy benchmark: ConvRec and our SASRec on the S3-Rec data, next to published numbers.

Run from the repository root::

    python -m benchmarks.accuracy benchmarks/configs/accuracy/*.toml --jobs 2 \
        --data-root /path/to/shared/data   # or $CONVREC_SHARED_DATA; default ../shared/data

One TOML plan per dataset (``benchmarks/configs/accuracy/``) names the data, the seeds, the
published numbers, the settings shared by every run, the final models (trained with every
seed, reported on test) and the tuning variants (seed 0 only, compared on validation). A run
lives in a folder named by a hash of its non-default settings, so a variant and a final model
with the same settings share their seed-0 run, and an interrupted benchmark resumes where it
stopped. Each final model is trained once per protocol and selected on that protocol's
validation NDCG@10, as the S3-Rec code does (one run early-stopped on full ranking, one on the
99 sampled negatives); the variants are compared on validation full NDCG@10. Test numbers are
read once per run, from its best-validation checkpoint.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import hashlib
import json
import multiprocessing
import os
import pathlib
import signal
import statistics
import sys
import tomllib
from dataclasses import dataclass

from benchmarks.machine import machine_info
from convrec.training.checkpoint import atomic_write
from convrec.training.config import TrainConfig

METRICS = ("HR@10", "NDCG@10")
PROTOCOL_NAMES = {"full": "full ranking", "sampled": "99 sampled negatives"}
PR_SET_PDEATHSIG = 1  # prctl option, <linux/prctl.h>
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SELECT = {protocol: f"{protocol}/NDCG@10" for protocol in PROTOCOL_NAMES}  # early stopping


@dataclass
class Plan:
    """One dataset's benchmark, read from its TOML file."""

    name: str
    data: str
    seeds: list[int]
    published: dict[str, dict[str, list[float]]]  # protocol -> system -> [HR@10, NDCG@10]
    common: dict
    models: dict[str, dict]
    variants: dict[str, dict]
    source: str
    notes: list[str]  # printed under the dataset's heading in the report

    def settings(self, name: str) -> dict:
        """A final model's or a variant's own keys (on top of ``common``)."""
        return self.models[name] if name in self.models else self.variants[name]

    def config(self, name: str, seed: int, protocol: str = "full") -> TrainConfig:
        """The run's full configuration: defaults < common < the model's or variant's keys,
        early-stopped on ``protocol``'s validation NDCG@10."""
        fixed = {"data": self.data, "seed": seed, "select": SELECT[protocol]}
        return TrainConfig.from_dict(self.common | self.settings(name) | fixed).check()

    def runs(
        self, names: list[str] | None = None, seeds: list[int] | None = None
    ) -> list[tuple[str, int, str]]:
        """(name, seed, protocol) of the runs the plan asks for (final models x seeds x
        protocols, variants x the first seed on full ranking), optionally only those of the
        given names and seeds."""
        runs = [(n, s, "full") for n in self.variants for s in self.seeds[:1]]
        runs += [(n, s, p) for s in self.seeds for p in PROTOCOL_NAMES for n in self.models]
        return [r for r in runs if (not names or r[0] in names) and (not seeds or r[1] in seeds)]


def load_plan(path: str | pathlib.Path, data_root: str | pathlib.Path) -> Plan:
    """Read and check one plan file; its ``data`` is resolved under ``data_root``. Raises
    ``ValueError`` naming the file for a malformed plan or an invalid entry (no data read)."""
    path = pathlib.Path(path)
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: {error}") from None
    missing = [k for k in ("dataset", "data", "seeds", "models") if k not in values]
    if missing:
        raise ValueError(f"{path}: missing keys {', '.join(missing)}")
    plan = Plan(
        name=values["dataset"],
        data=str(pathlib.Path(data_root) / values["data"]),
        seeds=[int(s) for s in values["seeds"]],
        published=values.get("published", {}),
        common=values.get("common", {}),
        models=values["models"],
        variants=values.get("variants", {}),
        source=str(path),
        notes=list(values.get("notes", [])),
    )
    tables = {"common": plan.common}
    tables |= {f"models.{n}": v for n, v in plan.models.items()}
    tables |= {f"variants.{n}": v for n, v in plan.variants.items()}
    for table, settings in tables.items():
        fixed = sorted({"data", "seed", "select"} & set(settings))
        if fixed:
            raise ValueError(
                f"{path}: [{table}] sets {', '.join(fixed)}, which the benchmark fixes "
                "(data from the plan, seeds from 'seeds', selection on validation NDCG@10)"
            )
    for name in list(plan.models) + list(plan.variants):
        plan.config(name, plan.seeds[0])  # every entry is a valid configuration
    return plan


def run_folder(
    runs_root: pathlib.Path, plan: Plan, name: str, seed: int, protocol: str = "full"
) -> pathlib.Path:
    """``runs_root/<dataset>/<model>-<hash>-seed<k>``, hashing the settings that differ from
    ``TrainConfig``'s defaults (the data path aside): a setting added to ``TrainConfig``
    later leaves every existing run where it is."""
    config = plan.config(name, seed, protocol)
    defaults = TrainConfig().to_dict()
    settings = {k: v for k, v in config.to_dict().items() if k != "data" and v != defaults[k]}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return runs_root / plan.name / f"{config.model}-{digest}-seed{seed}"


def _train_one(config: TrainConfig, folder: pathlib.Path, label: str, threads: int) -> dict | None:
    """Train (or resume, or just read) one run in a worker process; None when another process
    trains it (``train`` locks its folder: two benchmarks sharing a runs folder never train the
    same run)."""
    import torch

    from convrec.training.run_folder import RunFolderInUse
    from convrec.training.trainer import train

    torch.set_num_threads(threads)
    summary_path = folder / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    try:
        return train(
            config,
            folder,
            resume=(folder / "last.pt").exists(),
            progress=False,
            echo=lambda message: print(f"[{label}] {message}", flush=True),
        )
    except RunFolderInUse:
        return None


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: have Linux send this worker SIGTERM when the benchmark process dies,
    so a killed benchmark leaves no orphan taking the next run (the killed run resumes from
    its ``last.pt``)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the benchmark died before the request was in place
        os._exit(1)


def run_plans(
    plans: list[Plan],
    runs_root: pathlib.Path,
    jobs: int,
    names: list[str] | None = None,
    seeds: list[int] | None = None,
    threads: int | None = None,
) -> None:
    """Train every missing run of the plans, ``jobs`` at a time, each on ``threads`` threads
    (default cpus / jobs). A run that fails is reported when it fails and the others go on;
    ``RuntimeError`` names every failed run at the end."""
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    # seed by seed across the plans, so a benchmark cut short has every dataset's first seeds
    ordered = sorted(
        (
            (plan.seeds.index(seed), number, plan, name, seed, protocol)
            for number, plan in enumerate(plans)
            for name, seed, protocol in plan.runs(names, seeds)
        ),
        key=lambda entry: entry[:2],
    )
    todo: dict[pathlib.Path, tuple[TrainConfig, str]] = {}
    for _, _, plan, name, seed, protocol in ordered:
        folder = run_folder(runs_root, plan, name, seed, protocol)
        label = f"{plan.name} {name} seed {seed}" + ("" if protocol == "full" else f" {protocol}")
        todo.setdefault(folder, (plan.config(name, seed, protocol), label))
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_exit_with_parent, initargs=(os.getpid(),)
    )
    with pool:
        futures = {
            pool.submit(_train_one, config, folder, label, threads): label
            for folder, (config, label) in todo.items()
        }
        failed = []
        for future in concurrent.futures.as_completed(futures):
            try:
                summary = future.result()
            except Exception as error:  # report it at once and let the other runs go on
                failed.append(f"{futures[future]}: {error}")
                print(f"[{futures[future]}] failed: {error}", flush=True)
                continue
            if summary is None:
                print(f"[{futures[future]}] skipped: another process is training it", flush=True)
                continue
            test = summary["test"]
            print(
                f"[{futures[future]}] done: best epoch {summary['best_epoch']}, test full "
                f"NDCG@10 {test['full/NDCG@10']:.4f}, sampled NDCG@10 "
                f"{test['sampled/NDCG@10']:.4f}",
                flush=True,
            )
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed:\n" + "\n".join(failed))


def _log_summary(folder: pathlib.Path, select: str) -> dict:
    """Epochs, best epoch, training seconds and best validation metrics from ``log.csv``."""
    with open(folder / "log.csv", newline="") as f:
        log = list(csv.DictReader(f))
    best = max(log, key=lambda row: float(row[f"valid/{select}"]))
    return {
        "epochs": len(log),
        "best_epoch": int(best["epoch"]),
        "train_seconds": round(sum(float(row["epoch_seconds"]) for row in log), 1),
    } | {k: float(v) for k, v in best.items() if k.startswith("valid/")}


def collect(plan: Plan, runs_root: pathlib.Path) -> list[dict]:
    """One row per run of the plan with at least one epoch; ``finished`` is False for a run
    stopped before early stopping ended it (it has validation metrics only)."""
    rows = []
    for name, seed, protocol in plan.runs():
        folder = run_folder(runs_root, plan, name, seed, protocol)
        if not (folder / "log.csv").exists():
            continue
        finished = (folder / "summary.json").exists()
        row = {
            "dataset": plan.name,
            "name": name,
            "role": "final" if name in plan.models else "variant",
            "seed": seed,
            "selected_on": protocol,
            "settings": " ".join(f"{k}={v}" for k, v in sorted(plan.settings(name).items())),
            "finished": finished,
        } | _log_summary(folder, SELECT[protocol])
        if finished:
            summary = json.loads((folder / "summary.json").read_text())
            row |= {
                "parameters": summary["parameters"],
                "wall_seconds": round(summary["wall_seconds"], 1),
            }
            row |= {f"test/{k}": v for k, v in summary["test"].items()}
        row["run"] = folder.name
        rows.append(row)
    return rows


def mean_std(values: list[float]) -> str:
    """``mean ± sample sd`` to four decimals; a single value alone (no spread to show)."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _finished(rows: list[dict], name: str, selected_on: str) -> list[dict]:
    return [
        r
        for r in rows
        if r["name"] == name
        and r["role"] == "final"
        and r["finished"]
        and r["selected_on"] == selected_on
    ]


def _final_table(plan: Plan, rows: list[dict]) -> list[str]:
    """Published rows, then ours selected on the protocol's own validation and, under the
    sampled protocol, the same models selected on full ranking (what a single run gives)."""
    lines = [
        "| protocol | system | selected on validation | HR@10 | NDCG@10 | seeds | parameters | "
        "epochs (best) | train min / run | wall min / run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for protocol, title in PROTOCOL_NAMES.items():
        for system, (hr, ndcg) in plan.published.get(protocol, {}).items():
            lines.append(f"| {title} | {system} (published) | | {hr:.4f} | {ndcg:.4f} | | | | | |")
        selections = [protocol] + ([] if protocol == "full" else ["full"])
        for selected_on in selections:
            for name in plan.models:
                system = f"**{name}** (ours)" if selected_on == protocol else f"{name} (ours)"
                where = PROTOCOL_NAMES[selected_on]
                runs = _finished(rows, name, selected_on)
                if not runs:
                    lines.append(f"| {title} | {system} | {where} | not run | | | | | | |")
                    continue
                cells = [mean_std([r[f"test/{protocol}/{m}"] for r in runs]) for m in METRICS]
                epochs = ", ".join(f"{r['epochs']} ({r['best_epoch']})" for r in runs)
                train_min = statistics.mean(r["train_seconds"] for r in runs) / 60
                wall_min = statistics.mean(r["wall_seconds"] for r in runs) / 60
                lines.append(
                    f"| {title} | {system} | {where} | {cells[0]} | {cells[1]} | {len(runs)} | "
                    f"{runs[0]['parameters']:,} | {epochs} | {train_min:.1f} | {wall_min:.1f} |"
                )
    return lines


def _verdicts(plan: Plan, rows: list[dict], ours: str) -> list[str]:
    """Plain statements of where ``ours`` (mean over seeds, selected on the protocol's own
    validation) wins and where it does not."""
    lines = []
    for protocol, title in PROTOCOL_NAMES.items():
        runs = _finished(rows, ours, protocol)
        if not runs:
            lines.append(f"- {title}: {ours} has no finished run selected on it.")
            continue
        rivals = {f"{s} (published)": v for s, v in plan.published.get(protocol, {}).items()}
        for name in plan.models:
            theirs = _finished(rows, name, protocol)
            if name != ours and theirs:
                rivals[f"our {name}"] = [
                    statistics.mean(r[f"test/{protocol}/{m}"] for r in theirs) for m in METRICS
                ]
        mine = [statistics.mean(r[f"test/{protocol}/{m}"] for r in runs) for m in METRICS]
        for rival, values in rivals.items():
            for metric, a, b in zip(METRICS, mine, values, strict=True):
                word = "beats" if a > b else "does NOT beat"
                lines.append(
                    f"- {title}, {metric}: {ours} {a:.4f} {word} {rival} {b:.4f} "
                    f"({(a / b - 1) * 100:+.1f} %)"
                )
    return lines


def _variant_table(plan: Plan, rows: list[dict]) -> list[str]:
    """Every variant's validation scores, best first, and whether the first final of each model
    uses the settings of that model's best variant (a plan edited before its last variant
    finished would otherwise go unnoticed)."""
    variants = [r for r in rows if r["name"] in plan.variants and r["seed"] == plan.seeds[0]]
    select = SELECT["full"]
    if not variants:
        return []
    seed = plan.seeds[0]
    choices, best_of = [], {}
    for final in plan.models:
        model = plan.config(final, seed).model
        rivals = [r for r in variants if plan.config(r["name"], seed).model == model]
        if not rivals or model in best_of.values():
            continue  # the first final of each model is the tuned one
        best = max(rivals, key=lambda r: r[f"valid/{select}"])
        best_of[best["name"]] = model
        uses = plan.config(best["name"], seed) == plan.config(final, seed)
        choices.append(
            f"The final {final} uses the settings of the best {model} variant, {best['name']}."
            if uses
            else f"**The final {final} does NOT use the settings of the best {model} variant, "
            f"{best['name']}.**"
        )
    lines = [
        f"Variants tried (seed {seed}, selected on validation {select}; test not consulted). "
        "Settings are on top of the plan's common ones.",
        "",
        *choices,
        "",
        "| variant | settings | valid full HR@10 | valid full NDCG@10 | valid sampled NDCG@10 "
        "| epochs (best) | train min |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(variants, key=lambda r: -r[f"valid/{select}"]):
        mark = f" (best {best_of[r['name']]})" if r["name"] in best_of else ""
        if not r["finished"]:
            mark += " (stopped early by hand)"
        lines.append(
            f"| {r['name']}{mark} | {r['settings']} | {r['valid/full/HR@10']:.4f} | "
            f"{r['valid/full/NDCG@10']:.4f} | {r['valid/sampled/NDCG@10']:.4f} | "
            f"{r['epochs']} ({r['best_epoch']}) | {r['train_seconds'] / 60:.1f} |"
        )
    return lines


def write_report(plans: list[Plan], runs_root: pathlib.Path, out: pathlib.Path, command: str):
    """``accuracy.md`` and ``accuracy.csv`` in ``out`` from every finished run."""
    rows = [row for plan in plans for row in collect(plan, runs_root)]
    lines = [
        "# Accuracy on the S3-Rec benchmark data",
        "",
        f"Command: `{command}`",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine_info("cpu").items()),
        "",
        "Test metrics of the best-validation checkpoint, mean ± sample std over seeds. Each of "
        "our final models is trained once per protocol and early-stopped on that protocol's "
        "validation NDCG@10 (patience counted the same way), as the S3-Rec code selects its "
        "full-ranking and its sampled models (run_finetune_full.py, run_finetune_sample.py); "
        "under the sampled protocol the same models selected on full ranking are listed too. "
        "Full ranking excludes the user's seen items; sampled ranks the target against 99 "
        "unseen negatives. Published numbers: S3-Rec paper (CIKM 2020), same data and "
        "protocols. Train minutes count epochs only; wall minutes add evaluation.",
    ]
    for plan in plans:
        plan_rows = [r for r in rows if r["dataset"] == plan.name]
        lines += ["", f"## {plan.name}", "", f"Plan: `{plan.source}`", ""]
        lines += [f"- {note}" for note in plan.notes] + ([""] if plan.notes else [])
        lines += _final_table(plan, plan_rows)
        ours = next(iter(plan.models))
        lines += ["", *_verdicts(plan, plan_rows, ours)]
        variants = _variant_table(plan, plan_rows)
        if variants:
            lines += ["", *variants]
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    atomic_write(out / "accuracy.md", lambda f: f.write(text.encode()))
    if rows:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        with open(out / "accuracy.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return text


def default_data_root() -> pathlib.Path:
    """$CONVREC_SHARED_DATA, else ``shared/data`` beside the checkout (``../shared/data`` from
    the repository root), where the S3-Rec files live on the project's machines."""
    fallback = REPO_ROOT.parent / "shared" / "data"
    return pathlib.Path(os.environ.get("CONVREC_SHARED_DATA", fallback))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags."""
    parser.add_argument("plans", nargs="+", help="plan files, e.g. benchmarks/configs/accuracy/*")
    parser.add_argument(
        "--data-root",
        type=pathlib.Path,
        default=default_data_root(),
        help="folder holding s3rec/ (default: $CONVREC_SHARED_DATA or ../shared/data beside "
        "the checkout)",
    )
    parser.add_argument("--runs", default="runs/accuracy", help="folder of the training runs")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the report")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (1)")
    parser.add_argument("--only", nargs="+", help="train only these models/variants")
    parser.add_argument("--seeds", type=int, nargs="+", help="train only these seeds")
    parser.add_argument("--threads", type=int, help="threads per run (default cpus / jobs)")
    parser.add_argument(
        "--report-only", action="store_true", help="write the report from finished runs"
    )


def run(args: argparse.Namespace, command: str) -> None:
    """Check the selections, train the missing runs (unless ``--report-only``), write the
    report; ``command`` is the command line the report quotes."""
    plans = [load_plan(path, args.data_root) for path in args.plans]
    runs_root = pathlib.Path(args.runs)
    known = {name for plan in plans for name in [*plan.models, *plan.variants]}
    unknown = sorted(set(args.only or ()) - known)
    if unknown:
        raise SystemExit(f"no model or variant named {', '.join(unknown)} in the plans")
    missing = sorted(set(args.seeds or ()) - {s for plan in plans for s in plan.seeds})
    if missing:
        raise SystemExit(f"no plan has seed {', '.join(map(str, missing))}")
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        raise SystemExit(f"--jobs and --threads must be >= 1, got {args.jobs}, {args.threads}")
    if not args.report_only:
        run_plans(plans, runs_root, args.jobs, args.only, args.seeds, args.threads)
    print(write_report(plans, runs_root, pathlib.Path(args.out), command))


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.accuracy PLAN... [flags]``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description="ConvRec vs SASRec vs published numbers on the S3-Rec data",
    )
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    run(parser.parse_args(argv), " ".join(["python -m benchmarks.accuracy", *argv]))


if __name__ == "__main__":
    main()
