"""Backend choice (longkernels/ops/dispatch.py): demands, preferences and fallbacks that speak.

* ``backend=`` is a demand: the backend runs, or a ValueError lists why it cannot.
* ``LONGKERNELS_BACKEND`` is a preference: used where it can take the input, skipped where it cannot.
* A call whose device's first choice cannot run it (the extension missing or built for another torch, an
  input the kernels do not take) runs on the next backend with one FallbackWarning per operation and
  reason, and is counted; ``longkernels info`` says which backend a call gets and why.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import longkernels
from longkernels import _ext, cli
from longkernels.ops import dispatch
from longkernels.testing import rel_err

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"C++ extension not built: {_ext.LOAD_ERROR}")


@pytest.fixture
def no_extension(monkeypatch):
    """The package as it is without a usable extension."""
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "LOAD_ERROR", "longkernels._C is not built (simulated)")
    dispatch.reset_fallbacks()
    yield
    dispatch.reset_fallbacks()


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, 17, 8, generator=g) for _ in range(3)]


def test_missing_extension_warns_once_per_operation_and_reason(no_extension, seed):
    q, k, v = _inputs(seed)
    with pytest.warns(dispatch.FallbackWarning, match="memory_attention.*'cpu'.*not built.*'reference'"):
        out = longkernels.memory_attention(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call of the same operation and reason stays quiet
        longkernels.memory_attention(q, k, v)
    with pytest.warns(dispatch.FallbackWarning, match="lsh_attention"):  # another operation warns itself
        longkernels.lsh_attention(q, v, n_hashes=1, chunk_size=8)
    counts = dispatch.fallbacks()
    assert counts[("memory_attention", "cpu", "reference", "longkernels._C is not built (simulated)")] == 2
    assert rel_err(out, longkernels.memory_attention(q, k, v, backend="reference")) == 0


def test_demanded_backend_that_cannot_run_raises_with_the_reason(no_extension, seed):
    q, k, v = _inputs(seed)
    with pytest.raises(ValueError, match="backend 'cpu' cannot run these inputs: longkernels._C is not built"):
        longkernels.memory_attention(q, k, v, backend="cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        longkernels.memory_attention(q, k, v, backend="nope")


@needs_ext
@pytest.mark.parametrize("pref,expected", [("reference", "reference"), ("cpu", "cpu"),
                                           ("cuda", "cpu"),  # CUDA kernels cannot take CPU tensors: skipped
                                           ("nope", "cpu")])  # not a backend: ignored
def test_environment_is_a_preference(monkeypatch, pref, expected, seed):
    monkeypatch.setenv("LONGKERNELS_BACKEND", pref)
    q, k, v = _inputs(seed)
    from longkernels.ops.memory_attention import choose_backend
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # skipping a preference is no fallback from the device's choice
        assert choose_backend(q, v, None) == expected
        longkernels.memory_attention(q, k, v)
    assert choose_backend(q, v, "reference") == "reference"  # an argument still decides


def test_info_says_which_backend_a_call_gets(no_extension, capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    section = out.split("\nmemory_attention:")[1].split("\nlsh_attention:")[0]
    assert "cpu    cpu        unavailable: longkernels._C is not built (simulated)" in section
    assert "a call gets: reference (FALLBACK from cpu" in section


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_extension_built_for_another_torch_is_not_loaded():
    """The build records its torch (longkernels/_built_with.py); under another one the extension stays
    unloaded, with a warning naming both versions and the command that rebuilds it."""
    res = _python("""
        import sys, types, warnings
        sys.modules["longkernels._built_with"] = types.SimpleNamespace(TORCH_VERSION="1.0.0+other")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import longkernels
            from longkernels import _ext, cli
        msgs = [str(w.message) for w in caught if issubclass(w.category, _ext.ExtensionWarning)]
        print("WARNED", msgs)
        print("AVAILABLE", _ext.available())
        cli.main(["info"])
    """)
    assert res.returncode == 0, res.stderr
    assert "built against torch 1.0.0+other but torch" in res.stdout and "--no-build-isolation" in res.stdout
    assert "AVAILABLE False" in res.stdout
    assert f"built against torch 1.0.0+other, running torch {torch.__version__}" in res.stdout
    assert "a call gets: reference (FALLBACK from cpu" in res.stdout


def test_extension_that_fails_to_load_says_why():
    res = _python("""
        import sys
        sys.modules["longkernels._C"] = None  # what an import of a broken binary gives: ImportError
        import longkernels
        from longkernels import _ext
        print("REASON", _ext.LOAD_ERROR)
    """)
    assert res.returncode == 0, res.stderr
    assert "REASON longkernels._C" in res.stdout and "--no-build-isolation" in res.stdout
