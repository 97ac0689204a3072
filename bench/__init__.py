"""Benchmarks of longkernels: cases (``cases.py``), the engine behind ``longkernels bench`` (``engine.py``)
and the pytest-benchmark suites (``bench_*.py``)."""
