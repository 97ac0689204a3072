"""The README's code examples run as written: each ```python block, in a fresh interpreter, in order of
appearance (a block may not rely on an earlier one), from a directory outside the checkout."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    code = BLOCKS[index]
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"README example {index + 1} failed:\n{code}\n--- stderr ---\n{res.stderr[-3000:]}"
    assert "FallbackWarning" not in res.stderr, res.stderr
