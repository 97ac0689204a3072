"""pytest-benchmark suite of LSH attention: one benchmark per (case, implementation) of bench/cases.py.

    pytest bench/bench_lsh_attention.py --benchmark-enable                         # quick cases, timed
    LONGKERNELS_BENCH=full pytest bench/bench_lsh_attention.py --benchmark-enable  # the full sweep (slow)

The implementations of variant ``causal`` are layers over x (B, L, E): ``longkernels.nn.LSHSelfAttention``
(cpu backend on CPU, triton on CUDA), the same module on the reference, HuggingFace's ``LSHSelfAttention`` +
output dense with the same weights and rotations, and a dense causal SDPA layer of the same width. Variant
``op`` times the attention alone over (qk, v): ``longkernels.lsh_attention`` against dense causal SDPA. With
``--benchmark-disable`` (the project's default) every benchmark runs once: a smoke test that each
implementation is wired up and runs. Implementations that cannot run a case are skipped with their
reason. Timing comparisons belong to ``longkernels bench --ops lsh_attention`` (bench/engine.py); there
are no timing assertions here.
"""
import os

import pytest
import torch

from bench.cases import OPERATIONS, select_cases
from bench.engine import Runner, sync

OP = OPERATIONS["lsh_attention"]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = select_cases(OP, quick=os.environ.get("LONGKERNELS_BENCH", "quick") != "full", device=DEVICE)
IMPLS = {impl.name: impl for impl in OP.implementations}


@pytest.mark.parametrize("impl_name", list(IMPLS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_lsh_attention(benchmark, case, impl_name):
    impl = IMPLS[impl_name]
    reasons = impl.reasons(case, DEVICE)
    if reasons:
        pytest.skip(f"{impl_name}: " + "; ".join(reasons))
    benchmark.group = case.id
    benchmark.extra_info.update(op=case.op, mode=case.mode, shape=case.shape, dtype=str(case.dtype),
                                peer=impl.peer, flops=case.flops(), device=str(DEVICE))
    try:
        runner = Runner(case, impl, DEVICE, seed=CASES.index(case))
        if not benchmark.disabled:
            runner.step()  # warm-up outside the measurement

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


def test_lsh_layers_agree():
    """The LSH layers share weights and rotations, so their outputs (and input gradients) agree with
    the reference layer's: the benchmark compares like with like. (The engine checks this at every
    size it times; this is the quick version, float32, fwd+bwd.)"""
    case = next(c for c in CASES if c.mode == "fwdbwd" and c.dtype == torch.float32 and c.variant == "causal")
    results = {}
    for name in ("reference", "longkernels-cpu", "longkernels-triton", "hf_reformer"):
        impl = IMPLS[name]
        if impl.reasons(case, DEVICE):
            continue
        runner = Runner(case, impl, DEVICE, seed=0)
        out = runner.step()
        results[name] = (out.detach().double(), runner.inputs["x"].grad.double())
    assert "reference" in results and len(results) >= 2, list(results)
    ref_out, ref_dx = results.pop("reference")
    for name, (out, dx) in results.items():
        err = ((out - ref_out).norm() / ref_out.norm()).item()
        err_dx = ((dx - ref_dx).norm() / ref_dx.norm()).item()
        # HF loses ~3 digits in float32 on rows that see only themselves (see HFReformer.agree_tol).
        tol = IMPLS[name].agree_tol.get(torch.float32, 1e-4)
        assert err < tol and err_dx < tol, (name, err, err_dx, tol)


def test_lsh_ops_agree():
    """Variant op: the fused op's output and gradients of qk and v agree with the reference op's on the
    same inputs and rotations (float32, fwd+bwd)."""
    case = next(c for c in CASES if c.mode == "fwdbwd" and c.dtype == torch.float32 and c.variant == "op")
    results = {}
    for name in ("reference", "longkernels-cpu", "longkernels-triton"):
        if IMPLS[name].reasons(case, DEVICE):
            continue
        runner = Runner(case, IMPLS[name], DEVICE, seed=0)
        out = runner.step()
        results[name] = [t.detach().double() for t in (out, runner.inputs["qk"].grad, runner.inputs["v"].grad)]
    assert "reference" in results and len(results) >= 2, list(results)
    ref = results.pop("reference")
    for name, got in results.items():
        errs = [((a - b).norm() / b.norm()).item() for a, b in zip(got, ref)]
        assert max(errs) < 1e-4, (name, errs)
