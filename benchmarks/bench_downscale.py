"""pytest-benchmark groups for the ``downscale`` op: one group per shape, one benchmark per
provider (reference eager, reference under torch.compile, the convrec._C extension), each a
forward + backward step as in ``downscale_table.py`` (training, dropout 0.1, all-real mask).

Run: ``.venv/bin/python -m pytest benchmarks/bench_downscale.py`` (CPU, or CUDA when present;
the extension provider skips when convrec._C is not built). The side-by-side table of the
issue comes from ``benchmarks/downscale_table.py``.
"""

from __future__ import annotations

import pytest
import torch
from downscale_table import Case, providers, step_fn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# name: (B, L, D)
SHAPES = {
    "B64-L50-D64": (64, 50, 64),
    "B64-L512-D64": (64, 512, 64),
    "B64-L4096-D64": (64, 4096, 64),
}
PROVIDERS = ("reference", "compiled", "cuda" if DEVICE == "cuda" else "cpp")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_downscale_fwd_bwd(benchmark, shape: str, provider: str) -> None:
    backends = providers(DEVICE)
    if provider not in backends:
        pytest.skip("convrec._C is not built")
    batch, length, d_model = SHAPES[shape]
    case = Case(batch, length, d_model, DEVICE, torch.float32)
    step = step_fn(case, provider, backends[provider])

    def timed() -> None:
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"downscale {shape} fwd+bwd {DEVICE}"
    benchmark.extra_info["levels"] = str(case.levels)
    benchmark.pedantic(timed, rounds=5, warmup_rounds=2, iterations=1)
