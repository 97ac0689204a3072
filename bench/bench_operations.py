"""pytest-benchmark suite: one benchmark per (operation, case, implementation) of ``longkernels.benchmarks``.

    pytest bench --benchmark-enable                                # the quick cases, timed
    LONGKERNELS_BENCH=default pytest bench --benchmark-enable      # `longkernels bench`'s cases
    LONGKERNELS_BENCH=full pytest bench --benchmark-enable         # the whole sweep (slow on a CPU)

With ``--benchmark-disable`` (the project's default) every benchmark runs once: a smoke test that each
implementation is wired up and runs. Implementations that cannot run a case are skipped with their reason.
Timing comparisons belong to ``longkernels bench`` (``longkernels/benchmarks/engine.py``), which times
everything in interleaved rounds and reports ratios; there are no timing assertions here.
"""
import argparse
import os

import pytest
import torch

from longkernels.benchmarks import operations
from longkernels.benchmarks.base import select_cases
from longkernels.benchmarks.engine import CaseRun, Runner, sync
from longkernels._progress import Progress

LEVEL = os.environ.get("LONGKERNELS_BENCH", "quick")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OPERATIONS = operations()
CASES = {name: select_cases(op, level=LEVEL, device=DEVICE) for name, op in OPERATIONS.items()}
PARAMS = [(name, case, impl.name) for name, op in OPERATIONS.items() for case in CASES[name]
          for impl in op.implementations]
# Implementations whose per-shape setup is too slow to repeat for every case of a smoke run.
SLOW_SETUP = {"flex"}


def _first_runnable(name, impl):
    return next((c for c in CASES[name] if not impl.reasons(c, DEVICE)), None)


@pytest.mark.parametrize("op_name,case,impl_name", PARAMS, ids=[f"{c.id}-{i}" for _, c, i in PARAMS])
def test_benchmark(benchmark, op_name, case, impl_name):
    op = OPERATIONS[op_name]
    impl = next(i for i in op.implementations if i.name == impl_name)
    reasons = impl.reasons(case, DEVICE)
    if reasons:
        pytest.skip(f"{impl_name}: " + "; ".join(reasons))
    if benchmark.disabled and impl_name in SLOW_SETUP and case != _first_runnable(op_name, impl):
        pytest.skip(f"{impl_name}: compiled for the first case only when benchmarks are disabled")
    benchmark.group = case.id
    benchmark.extra_info.update(op=case.op, mode=case.mode, shape=case.shape, dtype=str(case.dtype),
                                peer=impl.peer, flops=case.flops(), device=str(DEVICE))
    try:
        runner = Runner(case, impl, DEVICE, seed=CASES[op_name].index(case))
        if not benchmark.disabled:
            runner.step()  # warm-up (and compilation) outside the measurement

        def step():
            runner.step()
            sync(DEVICE)

        benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)  # disabled: one smoke call
    except Exception as exc:
        if impl.peer:  # a peer that cannot run here is a skip, not a failure of longkernels
            pytest.skip(f"{impl_name} failed: {type(exc).__name__}: {str(exc).strip()[:200]}")
        raise
    if not benchmark.disabled and case.flops():
        benchmark.extra_info["flop_per_s_median"] = case.flops() / benchmark.stats.stats.median


@pytest.mark.parametrize("op_name", list(OPERATIONS))
def test_engine_runs_and_implementations_agree(op_name):
    """The engine on each operation's first float32 case: every longkernels implementation runs and its output
    agrees with the reference (or the peer the engine compares with), so the benchmark compares like with like."""
    op = OPERATIONS[op_name]
    case = next(c for c in CASES[op_name] if c.dtype == torch.float32)
    impls = [i for i in op.implementations if i.name not in SLOW_SETUP]
    args = argparse.Namespace(warmup=1, repeats=1, min_sample_ms=0.0)
    records = CaseRun(case, impls, DEVICE, args, Progress(1, enabled=False), seed=0).run()
    ours = [r for r in records if not r["peer"] and r.get("status") != "skipped"]
    assert ours, [(r["impl"], r.get("reason")) for r in records]
    for r in ours:
        assert r["status"] == "ok", (r["impl"], r.get("reason"))
        assert r.get("agrees") is not False, (r["impl"], r.get("rel_err"))
        assert r["median_ms"] > 0 and r.get("ratio_to_best_peer", 1.0) > 0
