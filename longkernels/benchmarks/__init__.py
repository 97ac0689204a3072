"""Benchmarks of every operation against its peers (docs/performance.md): ``longkernels bench``.

``OPERATIONS`` maps each operation's name to its ``base.Operation``: cases, implementations, sweeps. The
engine (``engine.py``) runs them; ``report.py`` prints the table and writes JSON and PNG. The
pytest-benchmark suites in the repository's ``bench/`` time the same cases.
"""
from __future__ import annotations

import importlib

MODULES = ("memory_attention", "lsh_attention", "relative_attention", "reversible", "reversible_coupling", "hf_models")


def operations() -> dict:
    """``{name: Operation}`` for every benchmarked operation (imported on first use)."""
    return {name: importlib.import_module(f"{__name__}.{name}").OPERATION for name in MODULES}
