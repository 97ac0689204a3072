"""LONGKERNELS_TRITON_AUTOTUNE=0: the launchers take the first config that fits instead of autotuning.

The GPU path itself runs only on a GPU (``make gpu-check`` runs the GPU tests this way); its compile for
every config is checked without one by tests/test_triton_compile.py. Here: the choice, on a stand-in kernel.
"""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402

from longkernels.triton_kernels import tuning  # noqa: E402
from longkernels.triton_kernels.memory_attention import _DKDV_CONFIGS, _FWD_CONFIGS, _prune  # noqa: E402


class FakeKernel:
    """Records launches; configs whose BLOCK_M x BLOCK_N exceeds ``fits`` raise as an oversized launch does."""

    def __init__(self, fits: int):
        self.fits, self.calls = fits, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append(kw)
            if kw.get("BLOCK_M", 0) * kw.get("BLOCK_N", 0) > self.fits:
                raise OutOfResources(300000, 232448, "shared memory")
        return launch


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False), ("off", False), ("false", False)])
def test_autotune_switch(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv(tuning.ENV_AUTOTUNE, raising=False)
    else:
        monkeypatch.setenv(tuning.ENV_AUTOTUNE, value)
    assert tuning.autotune_enabled() is on


def test_first_config_that_fits():
    k = FakeKernel(fits=128 * 64)
    meta = dict(BLOCK_D=64, BLOCK_DV=64, CAUSAL=True)
    got = tuning.launch_first_fitting(k, (1,), (1, 2), meta, _FWD_CONFIGS, prune=_prune(64 * 64))
    first = _FWD_CONFIGS[0]
    assert got == dict(first.kwargs, num_warps=first.num_warps, num_stages=first.num_stages)
    assert len(k.calls) == 1 and k.calls[0]["CAUSAL"] is True


def test_skips_configs_out_of_resources():
    k = FakeKernel(fits=64 * 32)
    got = tuning.launch_first_fitting(k, (1,), (), dict(BLOCK_D=64, BLOCK_DV=64), _FWD_CONFIGS)
    assert (got["BLOCK_M"], got["BLOCK_N"]) == (64, 32)
    tried = [(c["BLOCK_M"], c["BLOCK_N"]) for c in k.calls]
    assert tried == [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in _FWD_CONFIGS]  # in order, all but the last fail
    assert all(m * n > 64 * 32 for m, n in tried[:-1])


def test_prune_applies_for_long_heads():
    k = FakeKernel(fits=1 << 30)
    got = tuning.launch_first_fitting(k, (1,), (), dict(BLOCK_D=256, BLOCK_DV=256), _DKDV_CONFIGS,
                                      prune=_prune(32 * 64))
    assert got["BLOCK_M"] * got["BLOCK_N"] <= 32 * 64


def test_derived_constexprs_and_nothing_fits():
    k = FakeKernel(fits=1 << 30)
    got = tuning.launch_first_fitting(k, (1,), (), {}, _FWD_CONFIGS[:1],
                                      derived=lambda c: {"BLOCK_W": 2 * max(c["BLOCK_M"], c["BLOCK_N"])})
    assert k.calls[0]["BLOCK_W"] == 256 and got["BLOCK_W"] == 256
    with pytest.raises(OutOfResources):
        tuning.launch_first_fitting(FakeKernel(fits=0), (1,), (), {}, _FWD_CONFIGS)


def test_dot_precision_follows_torchs_float32_setting(monkeypatch):
    import torch

    matmul = torch.backends.cuda.matmul
    monkeypatch.setattr(matmul, "fp32_precision", "none")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert tuning.dot_precision(torch.float32) == "ieee"  # torch's default: no TF32
    assert tuning.dot_precision(torch.float64) == "ieee"
    assert tuning.dot_precision(torch.bfloat16) == tuning.dot_precision(torch.float16) == "tf32"  # (ignored)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")  # the legacy global setting
    assert tuning.dot_precision(torch.float32) == "tf32"
    monkeypatch.setattr(matmul, "fp32_precision", "ieee")  # the per-backend setting wins where it is set
    assert tuning.dot_precision(torch.float32) == "ieee"
    monkeypatch.setattr(matmul, "fp32_precision", "tf32")
    assert tuning.dot_precision(torch.float32) == "tf32"
    assert tuning.dot_precision(torch.float64) == "ieee"


def test_info_reports_the_triton_settings(monkeypatch, capsys):
    import torch

    from longkernels import cli

    monkeypatch.setenv(tuning.ENV_AUTOTUNE, "0")
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "tiles first config that fits" in out and "float32 products tf32" in out
    monkeypatch.setenv(tuning.ENV_AUTOTUNE, "1")
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "tiles autotuned" in out and "float32 products ieee" in out
