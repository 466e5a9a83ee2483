"""Forward+backward time and saved-activation bytes: ConvRecEncoder vs a SASRec encoder.

Both encoders see the same (B, L, D) batch, side by side in one process, so the ratios hold
on a noisy machine even when absolute seconds do not.
"""

from __future__ import annotations

import csv
import pathlib
import platform
import sys
from collections.abc import Sequence

import torch
from torch import nn

from convrec.baselines.sasrec import TransformerEncoder
from convrec.bench.measure import median_spread, parameter_tensors, saved_tensor_bytes, time_call
from convrec.encoder import ConvRecEncoder
from convrec.ops.dispatch import extension_status

ATTENTION = "SASRec-2blk-sdpa"


def _encoders(length: int, d_model: int) -> dict[str, nn.Module]:
    """ConvRecEncoder on the reference and, when built, the C++ extension; SASRec's encoder."""
    backends = ["reference"] + (["cpp"] if extension_status() is None else [])
    encoders: dict[str, nn.Module] = {
        f"ConvRecEncoder-{b}": ConvRecEncoder.for_length(length, d_model, dropout=0.1, backend=b)
        for b in backends
    }
    encoders[ATTENTION] = TransformerEncoder(
        d_model, max_len=length, num_blocks=2, heads=2, dropout=0.2, attention="sdpa"
    )
    return encoders


def compare_encoders(
    lengths: Sequence[int] = (50, 512, 2048),
    batch_size: int = 32,
    d_model: int = 64,
    repeats: int = 5,
    seed: int = 0,
) -> list[dict]:
    """One row per (encoder, L): median/min/max seconds of a training step and saved bytes."""
    torch.manual_seed(seed)
    rows = []
    for length in lengths:
        x = torch.randn(batch_size, length, d_model, requires_grad=True)
        mask = torch.ones(batch_size, length, dtype=torch.bool)
        for name, encoder in _encoders(length, d_model).items():
            encoder.train()

            def forward(e: nn.Module = encoder, x: torch.Tensor = x, m: torch.Tensor = mask):
                return e(x, m)

            median, low, high = median_spread(
                time_call(lambda f=forward: f().square().sum().backward(), repeats=repeats)
            )
            saved = saved_tensor_bytes(forward, parameter_tensors(encoder))
            rows.append(
                {
                    "encoder": name,
                    "L": length,
                    "B": batch_size,
                    "D": d_model,
                    "levels": getattr(encoder, "levels", ""),
                    "fwd_bwd_ms": median * 1e3,
                    "fwd_bwd_ms_min": low * 1e3,
                    "fwd_bwd_ms_max": high * 1e3,
                    "saved_bytes": saved,
                }
            )
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table with the SASRec/ConvRec ratios at each length."""
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
        "forward+backward of the encoder alone, median of repeats (min..max)",
        "",
        "| L | encoder | fwd+bwd ms | saved for backward | levels |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['L']} | {r['encoder']} | {r['fwd_bwd_ms']:.1f} "
            f"({r['fwd_bwd_ms_min']:.1f}..{r['fwd_bwd_ms_max']:.1f}) "
            f"| {r['saved_bytes'] / 2**20:.1f} MiB | {r['levels']} |"
        )
    lines += ["", "| L | ConvRec | time SASRec/ConvRec | saved bytes SASRec/ConvRec |"]
    lines.append("|---|---|---|---|")
    by_length: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_length.setdefault(r["L"], {})[r["encoder"]] = r
    for length, group in by_length.items():
        attn = group[ATTENTION]
        for name, conv in group.items():
            if name != ATTENTION:
                lines.append(
                    f"| {length} | {name} | {attn['fwd_bwd_ms'] / conv['fwd_bwd_ms']:.1f}x "
                    f"| {attn['saved_bytes'] / conv['saved_bytes']:.1f}x |"
                )
    return "\n".join(lines)


def write_results(out: pathlib.Path, stem: str, rows: list[dict], table: str, command: str) -> None:
    """``stem.csv`` (one row per encoder and L) and ``stem.md`` (the table and the command)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    flags = " ".join(sys.argv[3:]) if len(sys.argv) > 3 else ""
    (out / f"{stem}.md").write_text(f"{table}\n\nCommand: `{command} {flags}`\n")
