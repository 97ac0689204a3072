"""examples/hf_generate.py runs as its docstring says (quick mode), and both implementations agree."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="transformers is an optional extra: pip install .[hf]")

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "hf_generate.py"


def test_quick_run_generates_the_same_tokens_without_fallback(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "same tokens: True" in res.stdout, res.stdout
    assert "'fallbacks': {}" in res.stdout, res.stdout


def test_bad_arguments_are_refused(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--prompt", "0"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "--prompt must be at least 1" in res.stderr
