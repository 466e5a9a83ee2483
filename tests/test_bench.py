"""Measurement helpers count exactly what they claim; the encoder comparison runs end to end."""

from __future__ import annotations

import torch

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
