"""``longkernels check`` and ``longkernels info`` for LSH attention.

* ``check --ops lsh_attention`` runs every available LSH backend (cpu; triton under the interpreter)
  against the reference on random inputs, float64 and float32 (out, lse, d qk, d v; the low-precision
  rule of longkernels/testing.py), prints the rows in the check table and exits 0;
* a backend that disagrees makes it exit 1 with a MISMATCH row;
* ``info`` lists the LSH backends, the hash+sort implementation and the LSH torch ops;
* the helpers behind it (``longkernels.testing.compare``) hold a wrong result to the rule.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longkernels import cli, testing
from longkernels.ops.lsh_attention import not_supported_reasons

ROOT = Path(__file__).resolve().parent.parent


def _available(backend: str) -> bool:
    probe = torch.empty(1, 1, 1, 16)
    return not not_supported_reasons(backend, probe, probe)


def _lsh_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if " lsh B" in line]


def test_check_lsh_cpu(capsys):
    if not _available("cpu"):
        pytest.skip("the C++ extension is not built: " + "; ".join(not_supported_reasons("cpu", torch.empty(1, 1, 1, 1),
                                                                                          torch.empty(1, 1, 1, 1))))
    assert cli.main(["check", "--ops", "lsh_attention", "--backends", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = _lsh_rows(out)
    for dtype in ("float64", "float32"):
        assert any(r.startswith("cpu") and f" {dtype} " in r for r in rows), out
    assert rows and all(r.rstrip().endswith("ok") for r in rows), out
    assert "all backends match the reference" in out
    assert not any(line.startswith("cpu") and " lsh " not in line for line in out.splitlines()[2:] if line), \
        "--ops lsh_attention must leave memory attention out"


def test_check_lsh_triton_interpreter(capsys):
    if not _available("triton"):
        pytest.skip("; ".join(not_supported_reasons("triton", torch.empty(1, 1, 1, 16), torch.empty(1, 1, 1, 16))))
    assert cli.main(["check", "--ops", "lsh_attention", "--backends", "triton"]) == 0
    out = capsys.readouterr().out
    rows = _lsh_rows(out)
    assert any(r.startswith("triton") and " float64 " in r for r in rows), out
    assert any(r.startswith("triton") and " float32 " in r for r in rows), out
    assert all(r.rstrip().endswith("ok") for r in rows), out


def test_check_lsh_mismatch_exits_nonzero(capsys, monkeypatch):
    if not _available("cpu"):
        pytest.skip("the C++ extension is not built")
    real = testing.run_lsh

    def wrong(case, inputs, *, backend, **kw):  # a backend whose output is off by 1e-3
        result = real(case, inputs, backend=backend, **kw)
        if backend == "cpu":
            result["out"] = result["out"] * (1 + 1e-3)
        return result

    monkeypatch.setattr(testing, "run_lsh", wrong)
    assert cli.main(["check", "--ops", "lsh_attention", "--backends", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH out=" in out
    assert "mismatching runs" in out


def test_check_unknown_op(capsys):
    assert cli.main(["check", "--ops", "nope"]) == 2
    assert "unknown operations" in capsys.readouterr().err


def test_info_lists_lsh(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "\nlsh_attention:" in out
    section = out.split("\nlsh_attention:")[1].split("\nreversible_coupling:")[0]
    for backend in ("cpu", "triton", "reference"):
        assert any(line.split()[1:2] == [backend] for line in section.splitlines() if line.strip()), section
    assert "a call gets: " + ("cpu" if _available("cpu") else "reference") in section
    assert "hash+sort" in out
    for op in ("lsh_hash_sort", "lsh_attention_fwd", "lsh_attention_bwd", "lsh_attention_fwd_triton"):
        assert op in out.split("torch ops:")[1].splitlines()[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compare_lsh_rule(dtype):
    """The rule behind the rows passes the reference against itself and fails a perturbed result."""
    case = testing.LSHCase(B=2, L=40, chunk_size=8, causal=True, padding=True)
    rows = testing.compare(case, "reference", dtype)
    assert [r[0] for r in rows] == ["out", "lse", "dqk", "dv"]
    assert all(r[3] for r in rows), rows
    inputs = testing.make_lsh_inputs(case, dtype)
    truth = testing.run_lsh(case, inputs, backend="reference", dtype=torch.float64)
    got = testing.run_lsh(case, inputs, backend="reference")
    bad = got["dv"] * (1 + 1e-3)
    allowed = (testing.FLOAT64_RTOL if dtype == torch.float64 else
               testing.LOWP_FACTOR * testing.rel_err(got["dv"], truth["dv"]) + testing.LOWP_FLOOR[dtype])
    assert testing.rel_err(got["dv"], truth["dv"]) <= allowed < testing.rel_err(bad, truth["dv"])


def test_cli_module_entry_point():
    """``python -m longkernels check`` end to end: exit status and table."""
    if not _available("cpu"):
        pytest.skip("the C++ extension is not built")
    res = subprocess.run([sys.executable, "-m", "longkernels", "check", "--ops", "lsh_attention", "--backends", "cpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _lsh_rows(res.stdout)
