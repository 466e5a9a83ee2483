"""One backend vocabulary for every op (``convrec.ops.dispatch``): explicit requests run or
raise with the reason, "auto" falls back with one warning, ``set_backend`` pushes one name down
a model."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from convrec import ConvRec, ConvRecEncoder
from convrec.ops import conv_pool, dispatch, downscale
from convrec.ops.dispatch import IMPLEMENTATIONS, extension_status, resolve

CPU = torch.device("cpu")
SIMULATED = "the C++ extension convrec._C is not built (simulated)"


def test_reference_always_resolves() -> None:
    for op in IMPLEMENTATIONS:
        assert resolve(op, "reference", CPU) == "reference"


def test_unknown_backend_is_named() -> None:
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        resolve("downscale", "cudnn", CPU)


def test_cuda_backend_refuses_cpu_tensors() -> None:
    with pytest.raises(RuntimeError, match=r"downscale: backend 'cuda' is unavailable: .*runs on"):
        resolve("downscale", "cuda", CPU)


def test_a_backend_the_op_lacks_runs_its_reference() -> None:
    """ "cpp" names the extension, which conv_pool (Triton only) lacks: it runs its reference."""
    assert resolve("conv_pool", "cpp", CPU) == "reference"
    x, weight = torch.randn(2, 6, 4), torch.randn(4, 4, 3)
    expected = conv_pool(x, x, weight, None, 3, 1)
    for got, want in zip(conv_pool(x, x, weight, None, 3, 1, backend="cpp"), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_cpp_backend_matches_extension_status() -> None:
    if extension_status() is None:
        assert resolve("downscale", "cpp", CPU) == "cpp"
        assert resolve("downscale", "auto", CPU) == "cpp"
    else:
        assert_falls_back()


def assert_falls_back() -> None:
    with pytest.raises(RuntimeError, match=r"convrec\._C is not built"):
        resolve("downscale", "cpp", CPU)
    dispatch.warn_once.cache_clear()  # the warning fires once per process
    with pytest.warns(RuntimeWarning, match="downscale uses the PyTorch reference on cpu"):
        assert resolve("downscale", "auto", CPU) == "reference"


def test_missing_extension_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether or not this machine built convrec._C, a missing one behaves as documented."""
    monkeypatch.setattr(dispatch, "extension_status", lambda device_type="cpu": SIMULATED)
    assert_falls_back()


def test_auto_never_warns_where_no_fast_path_serves_the_device() -> None:
    """conv_pool has no CPU fast path (the Triton interpreter is for tests): nothing to miss."""
    dispatch.warn_once.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve("conv_pool", "auto", CPU) == "reference"


def test_downscale_auto_equals_reference() -> None:
    encoder = ConvRecEncoder(8, levels=[(2, 2), (3, 3)]).eval()
    x = torch.randn(2, 7, 8)
    params = encoder.level_params()
    args = (x, params, [2, 3], 1)
    auto = downscale(*args, backend="auto").user
    torch.testing.assert_close(auto, downscale(*args, backend="reference").user)


def test_explicit_backend_error_reaches_the_user() -> None:
    encoder = ConvRecEncoder(8, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        encoder(torch.randn(1, 4, 8))


def test_auto_warns_at_most_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "extension_status", lambda device_type="cpu": SIMULATED)
    dispatch.warn_once.cache_clear()
    encoder = ConvRecEncoder(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            encoder(torch.randn(1, 4, 8))
    assert sum("PyTorch reference" in str(w.message) for w in caught) == 1


def test_set_backend_reaches_every_module() -> None:
    model = ConvRec(30, d_model=8, backend="auto")
    assert model.set_backend("reference") is model
    assert model.backend == model.encoder.backend == model.item_encoder.backend == "reference"


def test_a_refused_backend_changes_nothing() -> None:
    model = ConvRec(30, d_model=8, levels=[(17, 17)], backend="reference")
    with pytest.raises(ValueError, match="kernel size 17 exceeds"):
        model.set_backend("triton")
    assert model.backend == model.encoder.backend == model.item_encoder.backend == "reference"


def test_a_missing_part_of_the_build_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the build recorded (convrec/_build_status.json) reaches the user at first use."""
    status = {
        "parts": {"cpu": {"state": "built"}, "cuda": {"state": "failed", "detail": "nvcc: X"}},
        "warning": "convrec._C: the CUDA part failed to build (nvcc: X)",
    }
    monkeypatch.setattr(dispatch.build_status, "read", lambda: status)
    dispatch.extension_status.cache_clear()
    try:
        reason = dispatch.extension_status("cuda")
        if importlib.util.find_spec("convrec._C") is not None:
            assert reason == "convrec._C was built without its cuda part (failed: nvcc: X)"
        else:
            assert reason.endswith("its build said: " + status["warning"])
    finally:
        dispatch.extension_status.cache_clear()
