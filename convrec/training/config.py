"""Training configuration: defaults, then a JSON/TOML file, then command-line flags."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from dataclasses import dataclass, field

from convrec.readouts import readout_names, upgrade_flags


@dataclass
class TrainConfig:
    """Everything a run depends on; stored in every checkpoint so runs can be resumed/audited."""

    data: str = "synthetic"
    format: str = "auto"
    timestamps: str | None = None  # S3-Rec: aligned time file kept elsewhere
    min_length: int = 3
    k_core: int | None = None
    model: str = "convrec"  # convrec | sasrec
    max_len: int = 50
    d_model: int = 64
    levels: list[list[int]] | None = None  # convrec: None = (2,2),(5,5),(7,7)
    heads: int | None = None  # conv heads (convrec, default 1) / attention heads (sasrec, 2)
    blocks: int = 2  # sasrec
    dropout: float | None = None  # default 0.1 for convrec, 0.2 for sasrec
    input_dropout: float = 0.0  # convrec: on the history item vectors (sasrec: = dropout)
    readouts: list[str] = field(default_factory=list)  # convrec: names in convrec.readouts
    mask_aware: bool = False
    faithful: bool = False
    leak_target_date: bool = False  # faithful: candidates get the target's date (a leak)
    use_attributes: bool = True
    use_time: bool = False
    backend: str = "auto"
    loss: str = "full"  # full | sampled
    negatives: int = 100
    train_sampling: str = "random-cut"  # random-cut | all-prefixes | all-positions (sasrec)
    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    patience: int = 10
    select: str = "full/NDCG@10"
    eval_batch_size: int = 512
    time_budget: float | None = None  # seconds of training before stopping early
    seed: int = 0
    device: str = "cpu"
    synthetic: dict | None = None  # options of the synthetic generator

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Settings by name; the readout booleans of earlier versions become ``readouts``."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = upgrade_flags({k.replace("-", "_"): v for k, v in values.items()})
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**values)

    def check(self) -> TrainConfig:
        choices = {
            "model": ("convrec", "sasrec"),
            "loss": ("full", "sampled"),
            "train_sampling": ("random-cut", "all-prefixes", "all-positions"),
            "device": ("cpu", "cuda"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = ("max_len", "d_model", "epochs", "batch_size", "eval_batch_size", "negatives")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.train_sampling == "all-positions" and (
            self.model != "sasrec" or self.loss != "full"
        ):
            raise ValueError(
                "train_sampling='all-positions' needs a causal model and the full softmax "
                f"(model='sasrec', loss='full'), got model={self.model!r}, loss={self.loss!r}"
            )
        if not 0.0 <= self.input_dropout < 1.0:
            raise ValueError(f"input_dropout must be in [0, 1), got {self.input_dropout}")
        if self.input_dropout and self.model != "convrec":
            raise ValueError(
                f"input_dropout is a ConvRec setting; {self.model}'s inputs use its dropout"
            )
        self.readouts = list(readout_names(self.readouts))
        if self.readouts and self.model != "convrec":
            raise ValueError(f"readouts are a ConvRec setting; {self.model} has no use for them")
        if self.leak_target_date and not (
            self.faithful and self.use_time and self.loss == "sampled"
        ):
            raise ValueError(
                "leak_target_date is the paper code's protocol: it needs faithful, use_time and "
                "loss='sampled' (candidates get the target's date)"
            )
        if self.leak_target_date and not self.select.startswith("sampled/"):
            raise ValueError(
                "leak_target_date scores sampled candidates only: select 'sampled/...'"
            )
        if "/" not in self.select:
            raise ValueError(f"select must look like 'full/NDCG@10', got {self.select!r}")
        return self


def read_config_file(path: str | pathlib.Path) -> dict:
    """Key/value pairs from a ``.json`` or ``.toml`` file (keys as in ``TrainConfig``)."""
    path = pathlib.Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    if path.suffix == ".json":
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return values
    raise ValueError(f"{path}: configuration files must end in .json or .toml")
