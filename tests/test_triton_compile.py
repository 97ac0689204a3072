"""Every Triton kernel compiles for a GPU (sm_90: H100/H200) as a GPU launch would build it, with no GPU here.

The interpreter tests check the kernels' numerics; they never meet the GPU compiler, the autotuner's tiles or
the shared-memory budget. ``tests/triton_compile.py`` drives the public operations with each launch replaced
by an ahead-of-time compile down to a cubin; these tests run it (in a fresh process: the kernels must be
decorated for the GPU, not for the interpreter) and check that it covers every kernel and that it reports
faults.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("triton_compile.py")


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


pytestmark = pytest.mark.skipif(not _nvidia_backend(), reason="triton with its NVIDIA backend is not installed")


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _kernels() -> set:
    """(module, name) of every kernel the package defines."""
    import importlib

    found = set()
    for mod in ("lsh_attention", "memory_attention", "relative_attention", "reversible_coupling"):
        module = importlib.import_module(f"longkernels.triton_kernels.{mod}")
        found |= {(module.__name__, name) for name in vars(module) if name.endswith("_kernel")}
    return found


def test_every_kernel_compiles_for_sm90(tmp_path):
    out = tmp_path / "compile.json"
    proc = _run("--quick", "--json", str(out), timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == []
    compiled = {(r["module"], r["kernel"]) for r in report["results"]}
    assert compiled == _kernels(), "kernels the check does not compile: " + str(_kernels() - compiled)
    assert all(r["ok"] for r in report["results"])
    # bfloat16 attention products, and float32 ones where TF32 is allowed, run on the tensor cores (a float32
    # IEEE dot lowers to FMA loops instead)
    attention = [r for r in report["results"] if ("bf16" in r["case"] or "TF32" in r["case"])
                 and r["kernel"] in ("_fwd_kernel", "_dq_kernel", "_dkdv_kernel")]
    assert any("TF32" in r["case"] for r in attention)
    assert {r["module"].rsplit(".", 1)[1] for r in attention} == {"memory_attention", "relative_attention",
                                                                  "lsh_attention"}
    assert [r["kernel"] for r in attention if r["mma"] == 0] == []


def test_the_compile_check_reports_faults():
    proc = _run("--self-check", timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "COMPILE ERROR" in proc.stdout and "OVER SHARED MEMORY" in proc.stdout
