"""Training configuration: defaults, then a JSON/TOML file, then command-line flags."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import types
import typing
from dataclasses import dataclass, field

from convrec.evaluation.metrics import METRIC_NAMES
from convrec.evaluation.protocols import PROTOCOLS
from convrec.readouts import readout_names, upgrade_flags
from convrec.schedule import check_levels

CHOICES = {
    "format": ("auto", "s3rec", "recbole", "movielens", "synthetic"),
    "model": ("convrec", "sasrec"),
    "backend": ("auto", "reference", "triton", "cpp", "cuda"),
    "loss": ("full", "sampled"),
    "train_sampling": ("random-cut", "all-prefixes", "all-positions"),
    "device": ("cpu", "cuda"),
}


class ConfigError(ValueError):
    """A setting of the wrong type or out of range; ``key`` names it (None: no single key)."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(message)
        self.key = key

    def __reduce__(self):
        return type(self), (self.key, str(self))


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
    streaming: bool = False  # convrec: windows anchored at the first event (all-positions)
    newest_last: bool | None = None  # streaming: open windows' items in their last slots
    # (None: True for streaming models, which resolve it in check(); False otherwise)
    mask_aware: bool = False
    faithful: bool = False
    leak_target_date: bool = False  # faithful: candidates get the target's date (a leak)
    use_attributes: bool = True
    use_time: bool = False
    backend: str = "auto"
    loss: str = "full"  # full | sampled
    negatives: int = 100
    train_sampling: str = "random-cut"  # random-cut | all-prefixes | all-positions (causal)
    window_step: int | None = None  # all-positions: windows step back by this (None: max_len)
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
    compile: bool = False  # training step under torch.compile (CUDA graphs on CUDA)
    synthetic: dict | None = None  # options of the synthetic generator
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))  # evaluated ones

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Settings by name; the readout booleans of earlier versions become ``readouts``."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = upgrade_flags({k.replace("-", "_"): v for k, v in values.items()})
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(unknown[0], f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**values)

    def check(self) -> TrainConfig:
        """Every setting's type and range, and how they combine, before any work is done.

        Raises ``ConfigError`` (a ``ValueError``) naming the key; whole numbers given for a
        float setting become floats.
        """
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                raise ConfigError(
                    f.name,
                    f"{f.name} must be {_describe(hints[f.name])}, "
                    f"got {value!r} ({type(value).__name__})",
                )
            if hints[f.name] in (float, float | None) and isinstance(value, int):
                setattr(self, f.name, float(value))
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    name, f"{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if not self.data:
            raise ConfigError("data", "data must name a dataset path or 'synthetic', got ''")
        positive = ("max_len", "d_model", "epochs", "batch_size", "eval_batch_size", "negatives")
        for name in (*positive, "blocks", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("k_core", "heads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(
                    name, f"{name} must be >= 1 (or unset), got {getattr(self, name)}"
                )
        if self.min_length < 3:
            raise ConfigError(
                "min_length",
                "min_length must be >= 3 (leave-one-out needs a training, a validation and a "
                f"test item per user), got {self.min_length}",
            )
        if not 0 <= self.seed < 2**63:
            raise ConfigError("seed", f"seed must be in [0, 2**63), got {self.seed}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("lr", f"lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(name, f"{name} must be >= 0, got {value}")
        if self.time_budget is not None and not (
            math.isfinite(self.time_budget) and self.time_budget > 0
        ):
            raise ConfigError(
                "time_budget", f"time_budget must be > 0 seconds (or unset), got {self.time_budget}"
            )
        for name in ("dropout", "input_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(name, f"{name} must be in [0, 1), got {value}")
        if self.levels is not None:
            try:
                check_levels(self.levels)
            except ValueError as error:
                raise ConfigError("levels", f"levels: {error}") from None
        heads = self.heads if self.heads is not None else (1 if self.model == "convrec" else 2)
        if self.d_model % heads:
            raise ConfigError("heads", f"d_model={self.d_model} is not divisible by heads={heads}")
        causal = self.model == "sasrec" or self.streaming
        if self.train_sampling == "all-positions" and (not causal or self.loss != "full"):
            raise ConfigError(
                "train_sampling",
                "train_sampling='all-positions' needs a causal model and the full softmax "
                "(model='sasrec', or convrec with streaming, and loss='full'), got "
                f"model={self.model!r}, streaming={self.streaming}, loss={self.loss!r}",
            )
        if self.window_step is not None:
            if self.train_sampling != "all-positions":
                raise ConfigError(
                    "window_step",
                    "window_step must come with train_sampling='all-positions' (it sets how "
                    f"the windows overlap), got train_sampling={self.train_sampling!r}",
                )
            if not 1 <= self.window_step <= self.max_len:
                raise ConfigError(
                    "window_step",
                    f"window_step must be in [1, max_len={self.max_len}], got {self.window_step}",
                )
        if self.streaming and self.model != "convrec":
            raise ConfigError(
                "streaming", f"streaming is a ConvRec setting; {self.model} has no use for it"
            )
        if self.newest_last and not self.streaming:
            message = "newest_last lays out a streaming model's open windows: set streaming"
            raise ConfigError("newest_last", message)
        if self.newest_last is None:
            self.newest_last = self.streaming
        if self.input_dropout and self.model != "convrec":
            raise ConfigError(
                "input_dropout",
                f"input_dropout is a ConvRec setting; {self.model}'s inputs use its dropout",
            )
        try:
            self.readouts = list(readout_names(self.readouts))
        except ValueError as error:
            raise ConfigError("readouts", str(error)) from None
        if self.readouts and self.model != "convrec":
            raise ConfigError(
                "readouts", f"readouts are a ConvRec setting; {self.model} has no use for them"
            )
        if self.leak_target_date and not (
            self.faithful and self.use_time and self.loss == "sampled"
        ):
            raise ConfigError(
                "leak_target_date",
                "leak_target_date is the paper code's protocol: it needs faithful, use_time and "
                "loss='sampled' (candidates get the target's date)",
            )
        if self.leak_target_date and list(self.protocols) != ["sampled"]:
            raise ConfigError(
                "leak_target_date",
                "leak_target_date scores sampled candidates only: pass protocols=['sampled'] "
                "(--protocols sampled) and a 'sampled/...' select",
            )
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise ConfigError(
                "protocols",
                f"protocols must be one or more of {', '.join(PROTOCOLS)}, got {self.protocols!r}",
            )
        self.protocols = [p for p in PROTOCOLS if p in self.protocols]
        if self.select not in self.metric_names():
            raise ConfigError(
                "select",
                f"select={self.select!r} is not a metric of the chosen protocols; choose "
                f"PROTOCOL/METRIC with PROTOCOL in {', '.join(self.protocols)} and METRIC in "
                f"{', '.join(METRIC_NAMES)}",
            )
        return self

    def metric_names(self) -> list[str]:
        """The validation/test metric keys a run with these protocols reports."""
        return [f"{p}/{m}" for p in self.protocols for m in METRIC_NAMES]


def _matches(value: object, hint: object) -> bool:
    """Whether ``value`` has the type ``hint`` of a setting (bools are not numbers here)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        (inner,) = typing.get_args(hint)
        return isinstance(value, list | tuple) and all(_matches(v, inner) for v in value)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    raise TypeError(f"no type check for {hint}")


def _describe(hint: object) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(parts) + " (or unset)"
    if origin is list:
        (inner,) = typing.get_args(hint)
        if typing.get_origin(inner) is list:
            return "a list of [kernel, stride] pairs of integers"
        return f"a list of {_describe(inner).split(' ', 1)[1]}s"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, "a table of options")


def read_config_file(path: str | pathlib.Path) -> dict:
    """Key/value pairs from a ``.json`` or ``.toml`` file (keys as in ``TrainConfig``).

    Raises ``FileNotFoundError`` or ``ConfigError`` (one line naming the file) for a missing,
    unreadable or malformed file.
    """
    path = pathlib.Path(path)
    if path.suffix not in (".json", ".toml"):
        raise ConfigError(None, f"{path}: configuration files must end in .json or .toml")
    if not path.is_file():
        raise FileNotFoundError(f"configuration file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(None, f"{path} is not a configuration file (not UTF-8 text)") from None
    if path.suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(None, f"{path}: invalid TOML: {error}") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(None, f"{path}:{error.lineno}: invalid JSON: {error.msg}") from None
    if not isinstance(values, dict):
        raise ConfigError(None, f"{path}: expected a JSON object of settings")
    return values
