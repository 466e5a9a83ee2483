"""What a scaling sweep runs and how its series are named, shared by the sweep and its report.

``benchmarks.scaling`` runs the sweep and ``benchmarks.scaling_report`` writes it up; both need
the sweep's settings and the series labels, so they live here and neither of those modules
imports the other's internals (the report does not import the sweep at all).
"""

from __future__ import annotations

import dataclasses

GIB = 2**30


def series_label(scope: str, model: str, backend: str) -> str:
    """ "ConvRec/cpp", "SASRec/sdpa", or "ConvRecEncoder/cpp", "SASRec-encoder/naive"."""
    if scope == "encoder":
        model = "ConvRecEncoder" if model == "ConvRec" else f"{model}-encoder"
    return f"{model}/{backend}"


@dataclasses.dataclass(frozen=True)
class Series:
    """One curve of the plots: a model with one backend (SASRec: its attention) in a scope."""

    scope: str
    model: str
    backend: str

    @property
    def label(self) -> str:
        return series_label(self.scope, self.model, self.backend)


@dataclasses.dataclass(frozen=True)
class Settings:
    """A sweep: what to run and the limits that keep it bounded."""

    device: str
    lengths: tuple[int, ...]
    batch_size: int
    d_model: int
    num_items: int
    top_k: int
    repeats: int
    budget_s: float
    memory_cap_bytes: int
    memory_limit_bytes: int | None
    scopes: tuple[str, ...]
    seed: int
    threads: int | None = None
    in_process: bool = False

    def command(self) -> str:
        """The command line (run from the repository root) that reproduces this sweep."""
        limit = self.memory_limit_bytes
        return (
            f"python -m benchmarks.scaling --device {self.device} "
            f"--lengths {' '.join(map(str, self.lengths))} --batch-size {self.batch_size} "
            f"--d-model {self.d_model} --items {self.num_items} --top-k {self.top_k} "
            f"--repeats {self.repeats} --budget {self.budget_s:g} "
            f"--memory-cap-gib {self.memory_cap_bytes / GIB:.3g} "
            + ("" if limit is None else f"--memory-limit-gib {limit / GIB:.3g} ")
            + f"--scopes {' '.join(self.scopes)} --seed {self.seed}"
            + ("" if self.threads is None else f" --threads {self.threads}")
            + (" --in-process" if self.in_process else "")
        )
