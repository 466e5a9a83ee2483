"""The scaling sweep writes a well-formed CSV, plots and report; the kernel summary reads
pytest-benchmark JSON. No timing assertions (docs/design.md section 4)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from benchmarks import kernels, scaling
from benchmarks.scaling_report import fit_slope
from benchmarks.scaling_worker import Config, metrics


@pytest.fixture
def _keep_threads():
    """The sweep sets torch's thread count for this process: put it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("_keep_threads")
def test_sweep_writes_csv_plots_and_report(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    cap_gib = 2048 / 2**30  # naive scores at B=2: 1 KiB at L=8, 4 KiB at L=16
    scaling.main(
        [
            "--lengths", "8", "16", "--batch-size", "2", "--d-model", "8",
            "--items", "30", "--repeats", "1", "--memory-cap-gib", str(cap_gib),
            "--threads", "1", "--out", str(tmp_path), "--no-progress", "--in-process",
        ]
    )  # fmt: skip
    with open(tmp_path / "scaling.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == scaling.COLUMNS
        rows = list(reader)
    keys = [(r["scope"], r["model"], r["backend"], r["device"], r["L"], r["metric"]) for r in rows]
    expected = {
        (s.scope, s.model, s.backend, "cpu", str(n), m)
        for s in scaling.all_series(("model", "encoder"), "cpu")
        for n in (8, 16)
        for m in metrics(s.scope)
    }
    assert len(keys) == len(set(keys)) and set(keys) == expected
    assert {r["status"] for r in rows} <= set(scaling.STATUSES)
    by_key = dict(zip(keys, rows, strict=True))
    for scope in ("model", "encoder"):
        for model, backend in (("ConvRec", "reference"), ("SASRec", "sdpa")):
            for n in ("8", "16"):
                for m in metrics(scope):
                    row = by_key[scope, model, backend, "cpu", n, m]
                    assert row["status"] == "ok", row
                    assert float(row["low"]) <= float(row["value"]) <= float(row["high"])
        assert by_key[scope, "SASRec", "naive", "cpu", "8", "saved_bytes"]["status"] == "ok"
        skipped = by_key[scope, "SASRec", "naive", "cpu", "16", "saved_bytes"]
        assert skipped["status"] == "skipped" and "predicted score tensor" in skipped["detail"]
    assert all(r["torch"] and r["cpu"] and r["threads"] for r in rows)

    report = (tmp_path / "scaling.md").read_text()
    for name in ("time_model.png", "memory_model.png", "time_encoder.png", "memory_encoder.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in report
    assert "python -m benchmarks.scaling --device cpu --lengths 8 16" in report
    assert "ConvRec / attention" in report and "| 16 |" in report


def test_worker_process_measures_one_configuration() -> None:
    config = Config(
        scope="encoder", model="ConvRec", backend="reference", device="cpu", length=8,
        batch_size=2, d_model=8, num_items=30, top_k=5, repeats=1, budget_s=60.0, seed=0,
        memory_limit_bytes=8 * 2**30, threads=1,
    )  # fmt: skip
    records, cost = scaling.run_config(config)
    assert set(records) == set(metrics("encoder"))
    assert all(r["status"] == "ok" for r in records.values()), records
    assert records["saved_bytes"]["value"] > 0 and cost is not None and cost > 0


def test_fit_slope_leaves_out_the_floor() -> None:
    lengths = [50, 128, 512, 1024, 2048, 4096, 8192, 16384]
    linear = [(n, 5.0 + 0.01 * n) for n in lengths]  # 10x its floor only from L ~ 5000: 3 largest
    fit = fit_slope(linear)
    assert fit is not None and fit.low == 4096 and fit.high == 16384
    assert math.isclose(fit.slope, 1.0, abs_tol=0.15)
    quadratic = fit_slope([(n, 1.0 + 1e-6 * n * n) for n in lengths])
    assert quadratic is not None and math.isclose(quadratic.slope, 2.0, abs_tol=0.1)
    assert fit_slope([(50, 1.0)]) is None


def test_predicted_seconds_extrapolates_the_last_slope() -> None:
    assert scaling.predicted_seconds([], 100) is None
    assert scaling.predicted_seconds([(100, 1.0)], 200) == pytest.approx(4.0)  # quadratic
    assert scaling.predicted_seconds([(100, 1.0), (200, 2.0)], 400) == pytest.approx(4.0)
    assert scaling.predicted_seconds([(100, 1.0), (200, 1.1)], 400) == pytest.approx(2.2)


def _fake_benchmark(group: str, provider: str, median: float, **params: str) -> dict:
    return {
        "group": group,
        "name": f"test_op[{provider}]",
        "params": {"provider": provider, **params},
        "extra_info": {"bytes": 4.3e9 * median, "flops": 2e12 * median},
        "stats": {"median": median, "rounds": 20},
    }


def test_kernels_summary_from_json(tmp_path, capsys) -> None:
    data = {
        "machine_info": {"python_version": "3.12", "cpu": {"brand_raw": "Test CPU"}},
        "datetime": "2026-01-01T00:00:00",
        "benchmarks": [
            _fake_benchmark("conv_pool B32 L512 fwd", "triton", 0.5e-3, dtype="fp32"),
            _fake_benchmark("conv_pool B32 L512 fwd", "reference", 2e-3, dtype="fp32"),
            _fake_benchmark("conv_pool B32 L512 fwd", "compiled", 1e-3, dtype="fp32"),
            _fake_benchmark("conv_pool B32 L512 fwd", "triton", 0.25e-3, dtype="bf16"),
            _fake_benchmark("downscale B8-L50 fwd+bwd cpu", "cpp", 4e-6),
        ],
    }
    rows = kernels.summarise(data)
    assert [(r["op"], r["shape"], r["provider"]) for r in rows] == [
        ("conv_pool", "B32 L512 bf16", "triton"),
        ("conv_pool", "B32 L512 fp32", "reference"),
        ("conv_pool", "B32 L512 fp32", "compiled"),
        ("conv_pool", "B32 L512 fp32", "triton"),
        ("downscale", "B8-L50 cpu", "cpp"),
    ]
    assert [r["speedup"] for r in rows] == [None, 1.0, 2.0, 4.0, None]
    assert [r["vs_compiled"] for r in rows] == [None, 0.5, 1.0, 2.0, None]
    assert rows[-1]["mode"] == "fwd+bwd"

    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    kernels.main(["--from-json", str(path), "--out", str(tmp_path / "out")])
    table = (tmp_path / "out" / "kernels.md").read_text()
    row = (
        "| conv_pool | B32 L512 fp32 | fwd | triton | 500 µs | 20 | 4.00x | 2.00x | 4.3 (0 %) | 2 |"
    )
    assert row in table
    assert "Test CPU" in table and table.strip() in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_registry_inputs_run_the_reference(mode: str) -> None:
    """Every op of the kernel-benchmark registry builds inputs its reference accepts, and the
    fwd+bwd step differentiates every tensor it names."""
    from benchmarks.ops.downscale import Shape
    from benchmarks.ops.spec import PROVIDERS, make_step, provider_problem
    from benchmarks.registry import REGISTRY, cases

    assert set(REGISTRY) == {"gather_embed", "conv_pool", "embed_conv_pool", "downscale"}
    assert {c[3] for c in cases()} <= set(PROVIDERS)
    cpu = torch.device("cpu")
    for bench in REGISTRY.values():
        assert provider_problem(bench, "cuda", cpu) is not None
        if mode not in bench.modes:
            continue
        shape = bench.tiny if bench.tiny is not None else Shape(2, 16, 8)
        inputs = bench.make_inputs(shape, cpu, torch.float32)
        assert inputs.wrt and all(t.requires_grad for t in inputs.wrt)
        make_step(bench, "reference", inputs, mode)()
        if bench.cost is not None:
            cost = bench.cost(shape, 4, mode)
            assert cost["bytes"] > 0 and cost["flops"] > 0
