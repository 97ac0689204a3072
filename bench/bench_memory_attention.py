"""pytest-benchmark suite of memory attention: one benchmark per (case, implementation) of bench/cases.py.

    pytest bench --benchmark-enable                         # the quick cases, timed
    LONGKERNELS_BENCH=full pytest bench --benchmark-enable  # the full sweep (slow on CPU)

With ``--benchmark-disable`` (the project's default) every benchmark runs once: a smoke test that each
implementation is wired up and runs. FlexAttention compiles per shape (~5-20 s each on CPU), so a
disabled run compiles it for its first case only. Implementations that cannot run a case are skipped
with their reason. Timing comparisons belong to ``longkernels bench`` (bench/engine.py), which times
everything in interleaved rounds and reports ratios; there are no timing assertions here.
"""
import os

import pytest
import torch

from bench.cases import OPERATIONS, select_cases
from bench.engine import Runner, sync

OP = OPERATIONS["memory_attention"]
CASES = select_cases(OP, quick=os.environ.get("LONGKERNELS_BENCH", "quick") != "full")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = {impl.name: impl for impl in OP.implementations}
# Implementations whose per-shape setup is too slow to repeat for every case of a smoke run.
SLOW_SETUP = {"flex"}
FIRST_CASE = {name: next((c for c in CASES if not impl.reasons(c, DEVICE)), None) for name, impl in IMPLS.items()}


@pytest.mark.parametrize("impl_name", list(IMPLS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_memory_attention(benchmark, case, impl_name):
    impl = IMPLS[impl_name]
    reasons = impl.reasons(case, DEVICE)
    if reasons:
        pytest.skip(f"{impl_name}: " + "; ".join(reasons))
    if benchmark.disabled and impl_name in SLOW_SETUP and case != FIRST_CASE[impl_name]:
        pytest.skip(f"{impl_name}: compiled for the first case only when benchmarks are disabled")
    benchmark.group = case.id
    benchmark.extra_info.update(op=case.op, mode=case.mode, shape=case.shape, dtype=str(case.dtype),
                                peer=impl.peer, flops=case.flops(), device=str(DEVICE))
    try:
        runner = Runner(case, impl, DEVICE, seed=CASES.index(case))
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
