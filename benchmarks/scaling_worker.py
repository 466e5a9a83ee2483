"""One configuration (scope, model, backend, L) of the scaling sweep, measured in this process.

``benchmarks.scaling`` starts ``python -m benchmarks.scaling_worker CONFIG_JSON RESULTS`` (in
the repository root) once per configuration: a fresh process makes each peak-RSS reading
independent of the others and lets the sweep kill a configuration that runs away. Results go
to a JSON-lines file, not to stdout (extensions may print there), one line per metric as soon
as it is known, so a killed worker still leaves what it finished.

Phases, in order. The first call of each measures memory and is untimed (a warm-up), unless it
takes at least ``LONG_CALL_S``: then one-time costs are negligible and it counts as a repeat.

- ``forward``: training-mode forward of the loss, recording autograd (the first call counts the
  bytes saved for backward: ``saved_bytes``).
- ``train_step``: forward + backward of the loss, no optimiser step (the first call gives the
  peak memory: ``train_peak_bytes``).
- ``topk`` (model scope only): ``recommend(ids, k)`` in eval mode over the whole catalogue
  (``topk_peak_bytes``).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
from collections.abc import Callable
from typing import TextIO

import torch

from benchmarks.peak_memory import peak_bytes
from convrec.baselines.sasrec import SASRec, TransformerEncoder
from convrec.bench.measure import median_spread, saved_tensor_bytes, time_call
from convrec.encoder import ConvRecEncoder
from convrec.model import ConvRec
from convrec.schedule import schedule_for_length
from convrec.training.losses import full_softmax_loss

SCOPES = ("model", "encoder")
ATTENTIONS = ("sdpa", "naive")  # SASRec's attention implementations, its "backends" here
ATTENTION_HEADS = 2  # SASRec's default, used to predict the size of materialised scores
LONG_CALL_S = 1.0  # a first call this long is timed too: one-time costs are lost in it
PLANNED_FRACTION = 0.5  # repeats are planned to fill half the budget; the rest is headroom

# (time metric, memory metric) of each phase, in the order they run
PHASES = {
    "model": (
        ("forward_s", "saved_bytes"),
        ("train_step_s", "train_peak_bytes"),
        ("topk_s", "topk_peak_bytes"),
    ),
    "encoder": (("forward_s", "saved_bytes"), ("train_step_s", "train_peak_bytes")),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything one worker needs; ``backend`` is SASRec's attention ("sdpa" / "naive")."""

    scope: str
    model: str
    backend: str
    device: str
    length: int
    batch_size: int
    d_model: int
    num_items: int
    top_k: int
    repeats: int
    budget_s: float
    seed: int
    memory_limit_bytes: int | None = None  # address-space limit (CPU only: CUDA reserves more)
    threads: int | None = None  # torch intra-op threads (None: torch's default)


# per phase: (the first call, returning bytes; the call to time)
Calls = list[tuple[Callable[[], int], Callable[[], object]]]


def metrics(scope: str) -> list[str]:
    """Metric names of a scope, in the order the worker measures them."""
    return [name for pair in PHASES[scope] for name in reversed(pair)]


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CPU, CUDA or Python) rather than a bug."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def _model_calls(config: Config, device: torch.device) -> Calls:
    """ConvRec or SASRec with the shared item encoder, trained with the full-softmax loss."""
    if config.model == "ConvRec":
        levels = schedule_for_length(config.length)
        model = ConvRec(config.num_items, config.d_model, levels, backend=config.backend)
    else:
        model = SASRec(
            config.num_items, config.d_model, max_len=config.length, attention=config.backend
        )
    model.to(device)
    shape = (config.batch_size, config.length)
    ids = torch.randint(1, config.num_items + 1, shape, device=device)
    targets = torch.randint(1, config.num_items + 1, shape[:1], device=device)

    def loss() -> torch.Tensor:
        model.train()
        return full_softmax_loss(model, ids, targets, None)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        loss().backward()

    def topk() -> object:
        model.eval()
        return model.recommend(ids, k=config.top_k)

    kept = [*model.parameters(), *model.buffers(), ids, targets]
    return [
        (lambda: saved_tensor_bytes(loss, kept), loss),
        (lambda: peak_bytes(train_step, device), train_step),
        (lambda: peak_bytes(topk, device), topk),
    ]


def _encoder_calls(config: Config, device: torch.device) -> Calls:
    """ConvRecEncoder or the SASRec encoder on random (B, L, D) inputs; loss = mean square."""
    if config.model == "ConvRec":
        encoder = ConvRecEncoder.for_length(config.length, config.d_model, backend=config.backend)
    else:
        encoder = TransformerEncoder(
            config.d_model, max_len=config.length, attention=config.backend
        )
    encoder.to(device).train()
    shape = (config.batch_size, config.length, config.d_model)
    x = torch.randn(shape, device=device, requires_grad=True)
    mask = torch.ones(shape[:2], dtype=torch.bool, device=device)

    def forward() -> torch.Tensor:
        return encoder(x, mask).square().mean()

    def train_step() -> None:
        encoder.zero_grad(set_to_none=True)
        x.grad = None
        forward().backward()

    kept = [*encoder.parameters(), *encoder.buffers(), x, mask]
    return [
        (lambda: saved_tensor_bytes(forward, kept), forward),
        (lambda: peak_bytes(train_step, device), train_step),
    ]


def _write(out: TextIO, **record: object) -> None:
    out.write(json.dumps(record) + "\n")
    out.flush()


def _failure(error: BaseException) -> tuple[str, str]:
    """(status, detail) of an error that ends a phase; other errors propagate (bugs)."""
    if isinstance(error, TimeoutError):
        return "timeout", str(error)
    if is_out_of_memory(error):
        return "oom", str(error).splitlines()[0][:200]
    raise error


def run(config: Config, out: TextIO) -> None:
    """Measure every phase of ``config``, writing one record per metric and a final cost.

    Repeats are planned to fill at most half of ``budget_s`` (at least one timing per phase);
    a phase that cannot get one timing within the whole budget is recorded as "timeout".
    Out-of-memory in a phase is recorded and the next phase still runs; any other error
    propagates (a bug, not a measurement).
    """
    device = torch.device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    make = _model_calls if config.scope == "model" else _encoder_calls
    try:
        calls = make(config, device)
    except (RuntimeError, MemoryError) as error:
        status, detail = _failure(error)
        _write(out, failed=metrics(config.scope), status=status, detail=f"setup: {detail}")
        return
    start = time.perf_counter()
    cost = 0.0
    for index, (time_metric, memory_metric) in enumerate(PHASES[config.scope]):
        measure_memory, call = calls[index]
        pending = [memory_metric, time_metric]
        try:
            if time.perf_counter() - start > config.budget_s:
                raise TimeoutError("the budget was spent by earlier phases")
            first = time.perf_counter()
            _write(out, metric=memory_metric, value=measure_memory())
            pending.remove(memory_metric)
            seconds = time.perf_counter() - first
            samples = [seconds] if seconds >= LONG_CALL_S else []
            elapsed = time.perf_counter() - start
            left = config.budget_s - elapsed
            if not samples and seconds > left:
                raise TimeoutError(f"one call takes {seconds:.1f} s, {max(left, 0):.1f} s left")
            share = (PLANNED_FRACTION * config.budget_s - elapsed) / (len(calls) - index)
            more = min(config.repeats - len(samples), int(share / seconds))
            samples += time_call(call, repeats=max(more, 0 if samples else 1), warmup=0)
            median, low, high = median_spread(samples)
            _write(out, metric=time_metric, value=median, low=low, high=high, repeats=len(samples))
            cost += median
        except (TimeoutError, RuntimeError, MemoryError) as error:
            status, detail = _failure(error)
            _write(out, failed=pending, status=status, detail=f"{time_metric[:-2]}: {detail}")
    _write(out, cost_s=cost)


def main(argv: list[str]) -> None:
    """``CONFIG_JSON RESULTS_PATH``: measure the configuration into the results file."""
    config = Config(**json.loads(argv[0]))
    if config.memory_limit_bytes is not None:
        limit = config.memory_limit_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    with open(argv[1], "w") as out:
        run(config, out)


if __name__ == "__main__":
    main(sys.argv[1:])
