"""Measurement helpers count exactly what they claim; the encoder comparison runs end to end."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest
import torch

from benchmarks.ranks_by_history_length import paired_difference
from benchmarks.run_summaries import markdown, plot, run_row
from convrec.bench.encoder_cost import compare_encoders, format_table, write_results
from convrec.bench.measure import saved_tensor_bytes
from convrec.cli import main
from convrec.ops.dispatch import extension_status


def test_saved_tensor_bytes_is_exact() -> None:
    x = torch.randn(100, 10, requires_grad=True)
    w = torch.randn(10, 10, requires_grad=True)
    # exp saves its output (4000 bytes); matmul saves x and w, w is excluded like a parameter
    assert saved_tensor_bytes(lambda: (x @ w).exp(), exclude=[w]) == 4000 + 4000
    # a storage saved twice counts once
    assert saved_tensor_bytes(lambda: x * x) == 4000
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: x.exp()) == 0


def test_compare_encoders_rows() -> None:
    rows = compare_encoders(lengths=[8, 20], batch_size=2, d_model=8, repeats=1)
    encoders = ["ConvRecEncoder-reference", "SASRec-2blk-sdpa"]
    if extension_status() is None:
        encoders.append("ConvRecEncoder-cpp")
    assert {(r["encoder"], r["L"]) for r in rows} == {(e, n) for e in encoders for n in (8, 20)}
    assert all(r["saved_bytes"] > 0 and r["fwd_bwd_ms"] > 0 for r in rows)
    table = format_table(rows)
    assert "| 20 | ConvRecEncoder-reference |" in table and "SASRec/ConvRec" in table


def test_write_results(tmp_path) -> None:
    rows = compare_encoders(lengths=[8], batch_size=2, d_model=8, repeats=1)
    write_results(tmp_path, "encoder_cpu", rows, format_table(rows), "convrec bench encoder")
    assert (tmp_path / "encoder_cpu.csv").read_text().startswith("encoder,L,B,D,levels")
    assert "Command: `convrec bench encoder" in (tmp_path / "encoder_cpu.md").read_text()


def test_cli_bench_encoder(capsys) -> None:
    main(
        [
            "bench",
            "encoder",
            "--lengths",
            "6",
            "--batch-size",
            "2",
            "--d-model",
            "8",
            "--repeats",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert "| 6 | SASRec-2blk-sdpa |" in out


def test_encoder_step_table(tmp_path) -> None:
    """The GPU step table's script, run on the CPU: rows for every (series, L), a series that
    cannot run here is marked, and the Markdown table has a cell for each."""
    from benchmarks.encoder_step import main as encoder_step

    args = ["--device", "cpu", "--lengths", "8", "20", "--dtypes", "fp32", "--batch", "2"]
    args += ["--d-model", "8", "--repeats", "3", "--out", str(tmp_path)]
    encoder_step([*args, "--series", "reference", "cuda", "sasrec-sdpa"])
    lines = (tmp_path / "encoder_step.csv").read_text().splitlines()
    assert lines[0].startswith("series,L,dtype,B,D,ms") and len(lines) == 1 + 3 * 2
    rows = [line.split(",") for line in lines[1:]]
    assert {r[0] for r in rows if r[10] == "ok"} == {"reference", "sasrec-sdpa"}
    assert all(r[10] == "unavailable" for r in rows if r[0] == "cuda")
    assert "| 20 | fp32 |" in (tmp_path / "encoder_step.md").read_text()


def test_gpu_check_packs_one_tarball(tmp_path) -> None:
    """The device script's plumbing, with no step selected: its status and nothing else lands
    in the one tarball it promises."""
    import subprocess
    import sys
    import tarfile

    tarball = tmp_path / "gpu_check.tgz"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "STEPS": "none"}
    subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(tmp_path / "data"), str(tarball)],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    with tarfile.open(tarball) as packed:
        names = packed.getnames()
        status = packed.extractfile("./status.md").read().decode()
    assert "./environment.log" in names
    assert "| build | skipped (STEPS) | 0 |" in status and "| epoch_sasrec | skipped" in status


def test_streaming_cost_table(tmp_path) -> None:
    from benchmarks.streaming_cost import main as streaming_cost

    args = ["--lengths", "30", "--batch", "2", "--d-model", "8", "--repeats", "2"]
    series = ["streaming push", "newest-last push", "full recompute", "SASRec KV cache"]
    streaming_cost([*args, "--out", str(tmp_path), "--series", *series])
    lines = (tmp_path / "streaming_cost.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 and all(",30,2,8," in line for line in lines[1:])
    table = (tmp_path / "streaming_cost.md").read_text()
    assert "| 30 |" in table and (tmp_path / "streaming_cost.png").stat().st_size > 0


def test_all_items_loss_table(tmp_path) -> None:
    from benchmarks.all_items_loss import main as all_items_loss

    all_items_loss(["--targets", "5", "9", "--items", "30", "--d-model", "4", "--repeats", "2",
                    "--out", str(tmp_path)])  # fmt: skip
    lines = (tmp_path / "all_items_loss.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 and {line.split(",")[0] for line in lines[1:]} == {
        "reference",
        "chunked",
    }
    table = (tmp_path / "all_items_loss.md").read_text()
    assert "| 9 | 30 |" in table and (tmp_path / "all_items_loss.png").stat().st_size > 0


def test_ranks_by_history_length_paired_difference() -> None:
    """The two-checkpoint column: mean of second - first per user, SE = sd / sqrt(users)."""
    first = np.array([0.0, 1.0, 0.5, 0.0])
    second = np.array([1.0, 1.0, 0.0, 0.5])  # differences 1, 0, -0.5, 0.5: sd sqrt(1.25 / 3)
    assert paired_difference(first, second) == "+0.2500 ± 0.3227"


def _fake_run(root, folder: str, valid: float, test: float) -> pathlib.Path:
    run = root / folder
    run.mkdir()
    metrics = {"full/HR@10": 2 * test, "full/NDCG@10": test, "sampled/HR@10": 0.5}
    summary = {"best_valid/full/NDCG@10": valid, "test": metrics, "epochs_trained": 12}
    (run / "summary.json").write_text(json.dumps(summary | {"best_epoch": 2}))
    return run


def test_run_summaries_groups_seeds_best_validation_first(tmp_path) -> None:
    runs = [
        _fake_run(tmp_path, "low_s0", 0.01, 0.5),
        _fake_run(tmp_path, "high_s1", 0.04, 0.1),
        _fake_run(tmp_path, "high_s0", 0.02, 0.3),
    ]
    rows = [run_row(r) for r in runs]
    assert rows[1]["seed"] == 1 and rows[1]["test/full/HR@10"] == 0.2
    assert math.isnan(rows[0]["test/sampled/NDCG@10"])  # a metric the run did not compute
    plot(rows, tmp_path / "tuning.png", reference=(0.03, 0.2))
    assert (tmp_path / "tuning.png").stat().st_size > 0
    lines = markdown(rows).splitlines()
    assert lines[2].startswith("| high | 0,1 | 0.0300 ± 0.0141 | 0.4000 ± 0.2828 | 0.2000 ± ")
    assert lines[3].startswith("| low | 0 | 0.0100 | 1.0000 | 0.5000 | 0.5000 | n/a |")
    (tmp_path / "bad").mkdir()
    with pytest.raises(ValueError, match="bad: run folders are named NAME_sSEED"):
        run_row(tmp_path / "bad")
    (tmp_path / "open_s3").mkdir()
    with pytest.raises(ValueError, match=r"open_s3: no summary\.json"):
        run_row(tmp_path / "open_s3")
    (tmp_path / "open_s3" / "summary.json").write_text("{")
    with pytest.raises(ValueError, match=r"open_s3/summary\.json: not JSON"):
        run_row(tmp_path / "open_s3")
    (tmp_path / "open_s3" / "summary.json").write_text(json.dumps({"test": {}}))
    with pytest.raises(ValueError, match="no 'best_valid/full/NDCG@10'"):
        run_row(tmp_path / "open_s3")
