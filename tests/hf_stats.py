"""What the Hugging Face tests share: longkernels.hf's counters cleared per test, and the check that every call
ran on longkernels' kernels."""
from __future__ import annotations

import pytest

import longkernels.hf as lkhf


@pytest.fixture(autouse=True)
def fresh_stats():
    lkhf.reset_stats()
    yield


def no_fallback() -> None:
    s = lkhf.stats()
    assert s["fallbacks"] == {} and s["longkernels"] > 0, s
