"""longkernels without transformers: the core imports, and longkernels.hf says what to install."""
from __future__ import annotations

import subprocess
import sys

BLOCK = "import sys; sys.modules['transformers'] = None\n"  # as if it were not installed


def _run(code: str):
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=300)


def test_core_imports_without_transformers():
    res = _run("import longkernels, longkernels.nn; print(longkernels.__version__)")
    assert res.returncode == 0, res.stderr[-2000:]


def test_hf_module_names_the_extra():
    res = _run("import longkernels.hf")
    assert res.returncode != 0
    assert "longkernels.hf needs Hugging Face transformers" in res.stderr and "longkernels[hf]" in res.stderr
