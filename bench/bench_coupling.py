"""The coupling arithmetic of a reversible backward step: fused kernel against the unfused torch ops.

    python -m bench.bench_coupling                    # the table, and bench/results/coupling_<device>.json
    python -m bench.bench_coupling --quick            # small sizes, few rounds (a smoke run)
    pytest bench/bench_coupling.py --benchmark-enable # the same cases as a pytest-benchmark suite

Per block and branch the backward of ``ReversibleSequence`` reconstructs ``x = y - fy`` and accumulates
``dy = dy + dgrad`` over the residual stream (float32 here); ``fy`` comes out of the branch in its compute
dtype (float32 or bfloat16) and is cast to the stream's. Implementations:

* ``torch``          what longkernels/reversible.py did before the kernel: ``fy.to(stream)``, ``y - fy``,
                     ``dy + dgrad``, three ops (two for a float32 branch), each with a fresh output.
* ``torch_add_``     the same with ``dy.add_(dgrad)`` in place: what in-place accumulation alone buys.
* ``fused``          ``longkernels.ops.reversible.coupling`` (C++ on CPU, Triton on CUDA): one pass,
                     fresh ``x`` and ``dy_out``.
* ``fused_inplace``  the same with ``dy_out`` written into ``dy`` (``inplace=True``), as the backward
                     uses it when it owns ``dy``.

Each is timed once per round, in rotating order (the drift of a shared machine hits all alike); the
table reports the median over rounds and the ratio ``torch / impl`` (above 1: faster than today's ops).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pytest
import torch

from longkernels.ops.reversible import coupling

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(8, 4096, 1024), (1, 16384, 512)]
QUICK_SHAPES = [(2, 256, 128)]
BRANCH_DTYPES = [torch.float32, torch.bfloat16]
IMPLS = ["torch", "torch_add_", "fused", "fused_inplace"]


def make_inputs(shape, branch_dtype, device=DEVICE, stream=torch.float32, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    y, fy, dy, dgrad = (torch.randn(shape, generator=g) for _ in range(4))
    return (y.to(device, stream), fy.to(device, branch_dtype), dy.to(device, stream), dgrad.to(device, stream))


def make_step(impl, y, fy, dy, dgrad):
    """A no-argument callable doing the coupling once (the in-place ones on a private copy of dy)."""
    if impl == "torch":
        def step():
            gy = fy.to(y.dtype)
            return y - gy, dy + dgrad
    elif impl == "torch_add_":
        acc = dy.clone()

        def step():
            gy = fy.to(y.dtype)
            return y - gy, acc.add_(dgrad)
    elif impl == "fused":
        def step():
            return coupling(y, fy, dy, dgrad)
    elif impl == "fused_inplace":
        acc = dy.clone()

        def step():
            return coupling(y, fy, acc, dgrad, inplace=True)
    else:
        raise ValueError(f"unknown impl {impl!r}")
    return step


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def time_impls(steps: dict, rounds: int, warmup: int = 2) -> dict:
    """Median seconds per call of each step, timed in interleaved, rotating rounds."""
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    _sync()
    samples = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            out = steps[n]()
            _sync()
            samples[n].append(time.perf_counter() - t0)
            del out
    return {n: statistics.median(s) for n, s in samples.items()}


def check_parity(y, fy, dy, dgrad) -> None:
    x, d = coupling(y, fy, dy, dgrad)
    assert torch.equal(x, y - fy.to(y.dtype)) and torch.equal(d, dy + dgrad), "fused coupling is not bitwise"


def run(shapes, rounds: int) -> list[dict]:
    records = []
    for shape in shapes:
        for bd in BRANCH_DTYPES:
            y, fy, dy, dgrad = make_inputs(shape, bd)
            check_parity(y, fy, dy, dgrad)
            steps = {impl: make_step(impl, y, fy, dy, dgrad) for impl in IMPLS}
            med = time_impls(steps, rounds)
            base = med["torch"]
            for impl in IMPLS:
                records.append({"shape": list(shape), "stream": "float32", "branch": str(bd).replace("torch.", ""),
                                "impl": impl, "median_ms": round(med[impl] * 1e3, 3),
                                "speedup_vs_torch": round(base / med[impl], 3), "rounds": rounds})
            del y, fy, dy, dgrad, steps
    return records


def format_table(records) -> str:
    lines = [f"{'shape':>16} {'branch':>9} " + " ".join(f"{i:>22}" for i in IMPLS)]
    keys = []
    for r in records:
        k = (tuple(r["shape"]), r["branch"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        row = {r["impl"]: r for r in records if (tuple(r["shape"]), r["branch"]) == k}
        cells = " ".join(f"{row[i]['median_ms']:>10.2f} ms ({row[i]['speedup_vs_torch']:.2f}x)" for i in IMPLS)
        lines.append(f"{'x'.join(map(str, k[0])):>16} {k[1]:>9} {cells}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench.engine import device_slug, environment

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    p.add_argument("--quick", action="store_true", help="small sizes, 3 rounds, no JSON unless --out")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/coupling_<device>.json)")
    args = p.parse_args(argv)
    if DEVICE.type == "cpu":
        torch.set_num_threads(args.threads)
    env = environment(DEVICE)
    shapes, rounds = (QUICK_SHAPES, 3) if args.quick else (SHAPES, args.rounds)
    records = run(shapes, rounds)
    print(format_table(records))
    if args.quick and args.out is None:
        return 0
    out = args.out or Path(__file__).resolve().parent / "results" / f"coupling_{device_slug(DEVICE)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    env["conventions"] = {"time": "median over rounds of one call; every impl once per round, rotating order",
                          "speedup_vs_torch": "torch median / impl median (above 1: faster than the unfused ops)"}
    out.write_text(json.dumps({"benchmark": "reversible_coupling", **env, "records": records}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------------------------
# pytest-benchmark: the same cases (small ones unless --benchmark-enable); no timing assertions.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("branch", BRANCH_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_coupling(benchmark, shape, branch, impl):
    if benchmark.disabled:
        shape = QUICK_SHAPES[0]
    y, fy, dy, dgrad = make_inputs(shape, branch)
    step = make_step(impl, y, fy, dy, dgrad)
    benchmark.group = f"coupling {'x'.join(map(str, shape))} {branch}"
    x, _ = benchmark.pedantic(step, rounds=7, iterations=1, warmup_rounds=1)
    assert torch.equal(x, y - fy.to(y.dtype))


if __name__ == "__main__":
    raise SystemExit(main())
