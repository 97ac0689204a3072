"""Context parallelism (docs/semantics.md §8): ring and Ulysses attention on 1-4 gloo processes of this
machine, against single-process ``memory_attention`` over the whole sequence.

Each world size runs every case in one spawn (``tests/_cp_worker.py``, one thread per process, a deadline
on the whole group so that a hang fails instead of blocking the suite). float64: output, LSE and the
gradients of q, k, v to 1e-10 (longkernels.testing.FLOAT64_RTOL) for every W. float32 / bfloat16: the
error against the float64 reference must not grow with W (W = 2..4 at most 2x that of W = 1). Bad input must
raise a ValueError on every rank, not hang.
"""
from __future__ import annotations

import functools
import os
import socket
import sys
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp

import longkernels
from longkernels.testing import FLOAT64_RTOL, case_seed, rel_err

sys.path.insert(0, os.path.dirname(__file__))
import _cp_worker  # noqa: E402

WORLD_SIZES = (1, 2, 3, 4)
DEADLINE_S = 240


def _case(fn, T, *, B=1, H=4, Hkv=2, D=16, Dv=None, causal=True, window=None, alibi=False, dtype="float64",
          bad=None, worlds=WORLD_SIZES, M=0, rel=False):
    cid = f"{fn}-T{T}-M{M}-B{B}-H{H}/{Hkv}-D{D}/{Dv or D}-{'causal' if causal else 'full'}-w{window}" \
          f"{'-alibi' if alibi else ''}{'-relative' if rel else ''}-{dtype}{'-bad_' + bad if bad else ''}"
    return dict(id=cid, fn=fn, T=T, B=B, H=H, Hkv=Hkv, D=D, Dv=Dv or D, causal=causal, window=window, alibi=alibi,
                dtype=dtype, bad=bad, seed=case_seed(cid), worlds=worlds, M=M, tail=min(M, T) or 1, rel=rel)


EXACT = [
    _case("ring", 64),                                           # 2W divides T for W = 1, 2, 4
    _case("ring", 37, H=2, Hkv=2, D=12, Dv=20),                   # 2W divides no T here; D not a power of 2
    _case("ring", 61, window=5),                                  # window shorter than a shard
    _case("ring", 61, window=40, alibi=True),                     # window longer than a shard
    _case("ring", 45, H=4, Hkv=1, alibi=True, B=2),
    _case("ring", 5, H=2, Hkv=1),                                 # shorter than 2W: some chunks empty
    _case("ring", 1, H=2, Hkv=2),
    _case("ring", 37, causal=False, alibi=True),
    _case("ring", 50, causal=False, window=9),
    _case("ring", 45, M=20),                                      # Transformer-XL memory on every rank
    _case("ring", 37, M=30, window=25, alibi=True, H=2, Hkv=1),   # the window reaches into the memory
    _case("ulysses", 37, H=12, Hkv=2, window=7, alibi=True),      # Hkv split or repeated by W
    _case("ulysses", 50, H=12, Hkv=4, causal=False),
    _case("ulysses", 29, H=12, Hkv=6, M=17, window=21),           # memory sliced by heads (Hkv 6: split or repeated)
    _case("ulysses", 41, H=12, Hkv=4, D=10, M=23, rel=True),      # Transformer-XL relative positions, memory
    _case("ulysses", 30, H=12, Hkv=12, M=9, window=14, rel=True),  # relative, the window inside the memory
]
# LongContextLM with its blocks on a context-parallel group: segments with memory (windowed and not).
LM = [dict(_case("lm", 24, M=16), segments=3), dict(_case("lm", 21, M=10, window=13), segments=3, reversible=False),
      # relative positions run Ulysses: 4 heads over 1, 2 or 4 ranks (3 is refused, see BAD)
      dict(_case("lm", 22, M=12, rel=True, worlds=(1, 2, 4)), segments=3),
      dict(_case("lm", 19, M=10, window=15, rel=True, worlds=(1, 2, 4)), segments=3, reversible=False)]
LOWP = [_case("ring", 256, H=4, Hkv=2, D=32, dtype=dt) for dt in ("float32", "bfloat16")]
BAD = [
    _case("ring", 40, bad="length", worlds=(2, 3, 4)),
    _case("ring", 40, bad="dtype", worlds=(2, 3, 4)),
    _case("ring", 40, window=6, bad="window", worlds=(2, 3, 4)),
    _case("ulysses", 40, H=4, bad="heads", worlds=(3,)),
    _case("ulysses", 40, bad="length", worlds=(2, 4)),
    _case("ulysses", 40, H=4, M=8, rel=True, bad="pos_emb", worlds=(2, 4)),     # one rank's P differs
    _case("ulysses", 40, H=4, M=8, rel=True, bad="short_pos", worlds=(2, 4)),   # P short of the sequence's reach
    _case("lm", 20, M=8, rel=True, bad="heads", worlds=(3,)),                   # 4 heads over 3 ranks
]
ALL = EXACT + LM + LOWP + BAD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.lru_cache(maxsize=None)
def _results(W: int) -> list[dict]:
    """Every rank's results of every case for world size W (one spawn)."""
    cases = [c for c in ALL if W in c["worlds"]]
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_cp_worker.worker, args=(W, _free_port(), out_dir, cases), nprocs=W, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + DEADLINE_S
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the {W}-process group did not finish within {DEADLINE_S} s (a hang)")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(W)]


def _assemble(ranks, cid, name, T):
    """The full tensor of `name` from every rank's rows (placed by their positions)."""
    parts = [r[cid] for r in ranks]
    for p in parts:
        assert "exception" not in p, p["exception"]
    first = parts[0][name]
    full = first.new_zeros(*first.shape[:2], T, *first.shape[3:])
    for p in parts:
        full[:, :, p["positions"]] = p[name]
    return full


def _single_process(case):
    q, k, v, dout, dlse, slopes, (mk, mv) = _cp_worker.full_inputs(case)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if mk is not None:
        mk, mv = mk.requires_grad_(), mv.requires_grad_()
    rel = {name: t.requires_grad_() for name, t in _cp_worker.relative_inputs(case).items()}
    out, lse = longkernels.memory_attention(q, k, v, mk, mv, causal=case["causal"], window=case["window"],
                                            alibi_slopes=slopes, return_lse=True, **rel)
    loss = (out * dout).sum() + (lse.masked_fill(torch.isinf(lse), 0) * dlse.to(lse.dtype)).sum()
    loss.backward()
    res = {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if mk is not None:
        res.update(dmk=mk.grad, dmv=mv.grad, tail_k=k.detach()[:, :, case["T"] - case["tail"]:])
    res.update({"d" + name: t.grad for name, t in rel.items()})
    return res


def _reference64(case):
    """The float64 reference on the case's (rounded) inputs."""
    q, k, v, dout, dlse, slopes, _ = _cp_worker.full_inputs(case)
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = longkernels.reference.memory_attention(q, k, v, causal=case["causal"], window=case["window"],
                                                      alibi_slopes=slopes, return_lse=True)
    loss = (out * dout.double()).sum() + (lse.masked_fill(torch.isinf(lse), 0) * dlse).sum()
    loss.backward()
    return {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


@pytest.mark.parametrize("W", WORLD_SIZES)
@pytest.mark.parametrize("case", EXACT, ids=[c["id"] for c in EXACT])
def test_float64_equals_single_process(W, case):
    ranks = _results(W)
    want = _single_process(case)
    for name in ("out", "lse", "dq", "dk", "dv"):
        got = _assemble(ranks, case["id"], name, case["T"])
        err = rel_err(got, want[name])
        assert err <= FLOAT64_RTOL, f"W={W} {name}: relative error {err:.2e} (seed {case['seed']})"
    if case["M"]:  # the memory's gradient: the ranks' parts sum to it; gather_tail: the same tail everywhere
        for name in ("dmk", "dmv"):
            err = rel_err(sum(r[case["id"]][name] for r in ranks), want[name])
            assert err <= FLOAT64_RTOL, f"W={W} {name}: relative error {err:.2e}"
        for r in ranks:
            assert torch.equal(r[case["id"]]["tail_k"], want["tail_k"])
    for name in ("dpos_emb", "dcontent_bias", "dpos_bias") if case["rel"] else ():  # the heads' parts sum to it
        err = rel_err(sum(r[case["id"]][name] for r in ranks), want[name])
        assert err <= FLOAT64_RTOL, f"W={W} {name}: relative error {err:.2e}"
    gathered = ranks[0][case["id"]]["gathered"]  # gather_sequence: the full output on every rank
    for r in ranks:
        assert torch.equal(r[case["id"]]["gathered"], gathered)
    assert rel_err(gathered, want["out"]) <= FLOAT64_RTOL


LM_RUNS = [(W, case) for case in LM for W in case["worlds"]]


@pytest.mark.parametrize("W, case", LM_RUNS, ids=[f"{c['id']}-W{W}" for W, c in LM_RUNS])
def test_long_context_lm_on_a_group(W, case):
    """Logits of every segment (rotary phases at the shard's positions, memory kept whole on every rank) and
    parameter gradients (summed over the ranks) equal the unsharded model's."""
    want = _cp_worker.run_lm(case, _cp_worker.build_lm(case))
    ranks = _results(W)
    for p in ranks:
        assert "exception" not in p[case["id"]], p[case["id"]]["exception"]
    logits = torch.zeros_like(want["logits"])
    for p in ranks:
        logits[:, :, p[case["id"]]["positions"]] = p[case["id"]]["logits"]
    assert rel_err(logits, want["logits"]) <= FLOAT64_RTOL
    for name, g in want["grads"].items():
        got = sum(p[case["id"]]["grads"][name] for p in ranks)
        assert rel_err(got, g) <= FLOAT64_RTOL, name


@pytest.mark.parametrize("case", LOWP, ids=[c["id"] for c in LOWP])
def test_low_precision_error_does_not_grow_with_world_size(case):
    ref = _reference64(case)
    errs = {W: {name: rel_err(_assemble(_results(W), case["id"], name, case["T"]).double(), ref[name].double())
                for name in ("out", "lse", "dq", "dk", "dv")} for W in WORLD_SIZES}
    for W in WORLD_SIZES[1:]:
        for name, e in errs[W].items():
            assert e <= 2.0 * errs[1][name], \
                f"{name}: error {e:.2e} at W={W} against {errs[1][name]:.2e} at W=1 ({errs})"


@pytest.mark.parametrize("case", BAD, ids=[c["id"] for c in BAD])
def test_bad_input_raises_on_every_rank(case):
    for W in case["worlds"]:
        ranks = _results(W)
        for r, res in enumerate(ranks):
            got = res[case["id"]]
            assert "exception" not in got, got.get("exception")
            assert got["error"] is not None, f"rank {r} of {W} raised nothing"
        assert len({res[case["id"]]["error"] for res in ranks}) == 1, "the ranks raised different errors"


# --------------------------------------------------------------------------------------------
# Single-process checks (no group needed)
# --------------------------------------------------------------------------------------------
def test_zigzag_layout_covers_every_position_once():
    from longkernels.distributed import zigzag_layout

    for W in range(1, 6):
        for T in (0, 1, 2 * W - 1, 2 * W, 2 * W + 1, 97):
            lay = zigzag_layout(T, W)
            pos = torch.cat([lay.positions(r) for r in range(W)])
            assert torch.equal(pos.sort().values, torch.arange(T))
            assert max(lay.local_length(r) for r in range(W)) - min(lay.local_length(r) for r in range(W)) <= 2


def test_window_sends_only_the_tail():
    """With a window much shorter than a shard, the forward sends the window's tail (w - 1 rows of two chunks
    per rank, one round) instead of every rank's K/V to every other rank."""
    from longkernels.distributed import bytes_sent

    T, W, w = 16384, 4, 128
    full = bytes_sent(T, W, heads_kv=8, head_dim=128, causal=False)
    causal = bytes_sent(T, W, heads_kv=8, head_dim=128)
    win = bytes_sent(T, W, heads_kv=8, head_dim=128, window=w)
    assert full["bytes"] == full["full_ring_bytes"] and full["rounds"] == W - 1
    # Causal: a rank's later chunk is hidden from every higher rank, so it is not sent there (3/4 of the ring).
    assert causal["bytes"] == 3 * full["bytes"] // 4 and causal["rounds"] == W - 1
    shard = T // W
    assert win["bytes"] <= (w / shard) * full["bytes"]
    assert win["bytes"] == 2 * W * (w - 1) * 8 * 256 * 2 - 2 * (w - 1) * 8 * 256 * 2  # ranks 0 and W-1 send one tail less
    assert win["rounds"] == 2  # to r + 1 and r - 1 only


def test_needs_an_initialised_group():
    from longkernels.distributed import ring_attention

    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(q, q, q)


def test_context_parallel_benchmark_smoke(tmp_path):
    """The benchmark's plumbing: two gloo processes, a small causal shape, one step per measurement."""
    import json
    import subprocess

    out = tmp_path / "cp.json"
    proc = subprocess.run([sys.executable, "-m", "longkernels.benchmarks.context_parallel", "--world", "2",
                           "--lengths", "256", "--dtypes", "float32", "--reps", "1", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["mode"] for r in rows} == {"fwd", "fwdbwd"}
    for r in rows:
        assert r["world"] == 2 and r["T"] == 256 and r["ring"] > 0 and r["compute"] > 0 and r["comm"] > 0
        assert r["bytes_sent"] > 0 and r["forward_bytes"] == 3 * r["full_ring_forward_bytes"] // 4
