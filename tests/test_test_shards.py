"""LONGKERNELS_TEST_SHARD=i/n (tests/conftest.py): the shards split the selected tests, each exactly once."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def _collect(shard=None, *extra):
    env = dict(os.environ)
    env.pop("LONGKERNELS_TEST_SHARD", None)
    if shard:
        env["LONGKERNELS_TEST_SHARD"] = shard
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                           str(HERE / "test_triton_tuning.py"), *extra], env=env, capture_output=True, text=True,
                          cwd=HERE.parent)
    return proc, {line for line in proc.stdout.splitlines() if "::" in line}


def test_shards_partition_the_selection():
    _, everything = _collect(None, "-k", "not prune")
    assert len(everything) >= 5
    parts = [_collect(f"{i}/3", "-k", "not prune")[1] for i in range(3)]
    assert set().union(*parts) == everything
    assert sum(len(p) for p in parts) == len(everything)
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_bad_shard_is_a_usage_error():
    proc, _ = _collect("3/3")
    assert proc.returncode != 0 and "LONGKERNELS_TEST_SHARD" in proc.stdout + proc.stderr
