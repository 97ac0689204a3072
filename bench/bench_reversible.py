"""pytest-benchmark suite of reversible stacks: one fwd+bwd step per (block kind, depth, implementation).

    pytest bench/bench_reversible.py --benchmark-enable     # timed
    pytest bench/bench_reversible.py                         # --benchmark-disable (the default): one
                                                             # smoke step each, plus a wiring check

The depth sweep with memory and the reversible/plain/checkpoint ratios is ``python -m
bench.reversible_depth`` (which times everything in interleaved rounds); there are no timing
assertions here.
"""
import pytest
import torch

from bench.reversible_depth import IMPLS, Step, build, make_blocks, make_input

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = {"mlp": dict(dim=64, hidden=256, batch=2, length=64), "lsh": dict(dim=64, hidden=128, batch=1, length=128)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("depth", [2, 8])
@pytest.mark.parametrize("kind", ["mlp", "lsh"])
def test_reversible_depth(benchmark, kind, depth, impl):
    size = SIZES[kind]
    blocks = make_blocks(kind, depth, size["dim"], size["hidden"], chunk_size=32)
    for b in blocks:
        b.to(DEVICE)
    x = make_input(size["batch"], size["length"], size["dim"], torch.float32, DEVICE)
    step = Step(build(impl, blocks), x)
    benchmark.group = f"{kind} depth {depth}"
    benchmark.extra_info.update(kind=kind, depth=depth, impl=impl, device=str(DEVICE), **size)
    if not benchmark.disabled:
        step()  # warm-up outside the measurement
    out = benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    # Wiring check: every implementation computes the plain sequence's output (same seed, same blocks).
    ref = Step(build("plain", blocks), x)()
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert x.grad is not None and torch.isfinite(x.grad).all()
