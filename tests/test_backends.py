"""Backend resolution: explicit requests raise with the reason, "auto" falls back with a warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from convrec import ConvRecEncoder, backends
from convrec.backends import extension_status, resolve_backend

CPU = torch.device("cpu")


def test_reference_always_resolves() -> None:
    assert resolve_backend("reference", CPU) == "reference"


def test_cuda_backend_refuses_cpu_tensors() -> None:
    with pytest.raises(RuntimeError, match="runs on cuda tensors, got cpu"):
        resolve_backend("cuda", CPU)


def test_cpp_backend_matches_extension_status() -> None:
    if extension_status() is None:
        assert resolve_backend("cpp", CPU) == "cpp"
        assert resolve_backend("auto", CPU) == "cpp"
    else:
        assert_falls_back()


def assert_falls_back() -> None:
    with pytest.raises(RuntimeError, match=r"convrec\._C is not built"):
        resolve_backend("cpp", CPU)
    backends.warn_once.cache_clear()  # the warning fires once per process
    with pytest.warns(RuntimeWarning, match="PyTorch reference"):
        assert resolve_backend("auto", CPU) == "reference"


def test_missing_extension_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether or not this machine built convrec._C, a missing one behaves as documented."""
    reason = "the C++ extension convrec._C is not built (simulated)"
    monkeypatch.setattr(backends, "extension_status", lambda: reason)
    assert_falls_back()


def test_explicit_backend_error_reaches_the_user() -> None:
    encoder = ConvRecEncoder(8, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        encoder(torch.randn(1, 4, 8))


def test_auto_warns_at_most_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "extension_status", lambda: "convrec._C is not built (simulated)")
    backends.warn_once.cache_clear()
    encoder = ConvRecEncoder(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            encoder(torch.randn(1, 4, 8))
    assert sum("PyTorch reference" in str(w.message) for w in caught) == 1
