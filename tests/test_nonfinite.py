"""Non-finite and extreme inputs behave like the reference (docs/semantics.md, "Non-finite inputs").

* A NaN in a visible query, key or value reaches every row that sees it, on every path (the running row max
  must not swallow it). The reference materialises every score, so it also spreads NaN through products with
  hidden keys (0 * NaN); the kernels skip hidden tiles. So for outputs, LSEs and gradients alike: NaN wherever
  a row-by-row computation over only the visible keys gives NaN (``_rowwise``, the exact math), and finite
  wherever the reference is finite; equal to the reference to the usual tolerance on the rest.
* Huge but finite logits: the backward's recomputed probabilities never exceed 1, gradients stay finite and
  no larger than the reference's.
* LSH attention hashes a NaN into the bucket ``torch.argmax`` gives (the reference's rule), so no other token
  moves; integer arguments beyond what the kernels index with are a ValueError naming the argument.
"""
from __future__ import annotations

import os

import pytest
import torch

import longkernels
from longkernels import _ext
from longkernels.ops import dispatch
from longkernels.ops.lsh_attention import hash_sort
from longkernels.reference.lsh_attention import lsh_hash, padding_mask
from longkernels.testing import FLOAT64_RTOL, case_seed, rel_err

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"C++ extension not built: {_ext.LOAD_ERROR}")
HAS_TRITON = not dispatch.triton_reasons("cpu")

# (backend, LONGKERNELS_CPU_TILES): every CPU path this machine can run, and Triton under the interpreter.
PATHS = [("cpu", None), ("cpu", "blas")]
if _ext.available() and _ext.build_info().get("cpu_avx2_fma"):
    PATHS.append(("cpu", "avx2"))
if HAS_TRITON:
    PATHS.append(("triton", None))
NAN = float("nan")


def _leaves(ts, dtype):
    return [t.detach().to(dtype).clone().requires_grad_() for t in ts]


def _run(backend, inputs, dtype, *, window, causal=True, alibi=None):
    q, k, v, mk, mv, dout = inputs
    leaves = _leaves((q, k, v, mk, mv), dtype)
    out, lse = longkernels.memory_attention(*leaves, causal=causal, window=window, alibi_slopes=alibi,
                                            return_lse=True, backend=backend)
    (out * dout.to(out.dtype)).sum().backward()
    return [out.detach().double(), lse.detach().double()] + [t.grad.double() for t in leaves]


def _rowwise(inputs, *, window, causal=True):
    """Each query row over exactly its visible keys (a slice, no mask), float64 with autograd: NaN reaches
    what it affects mathematically and nothing else."""
    q, k, v, mk, mv, dout = inputs
    q, k, v, mk, mv = _leaves((q, k, v, mk, mv), torch.float64)
    B, H, N, D = q.shape
    M = mk.shape[2]
    group = H // k.shape[1]
    K = torch.cat([mk, k], 2).repeat_interleave(group, 1)
    V = torch.cat([mv, v], 2).repeat_interleave(group, 1)
    outs, lses = [], []
    for i in range(N):
        hi = M + i + 1 if causal else M + N
        lo = max(0, M + i - window + 1) if window else 0
        s = (q[:, :, i:i + 1] @ K[:, :, lo:hi].transpose(-1, -2)) * D ** -0.5
        outs.append(torch.softmax(s, -1) @ V[:, :, lo:hi])
        lses.append(torch.logsumexp(s, -1))
    out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
    (out * dout.double()).sum().backward()
    return [out.detach(), lse.detach()] + [t.grad for t in (q, k, v, mk, mv)]


NAN_PLACES = {
    # where: (tensor index in (q, k, v, mk, mv), index given M)
    "a memory key, the first tile's only visible one for some rows": (3, lambda M: (0, 0, 0, 0)),
    "all keys of the first memory tile": (3, lambda M: (0, 0, slice(0, min(512, M - 20)), 0)),
    "a current key": (1, lambda M: (0, 0, 2, 0)),
    "a current value": (2, lambda M: (0, 1, 2, 0)),
    "a query": (0, lambda M: (0, 0, 1, 1)),
    "a memory value": (4, lambda M: (0, 1, M - 50, 2)),
}
NAMES = ("out", "lse", "dq", "dk", "dv", "dmem_k", "dmem_v")


def _nan_inputs(where, seed, M, N):
    """M = 600 crosses the C++ kernels' 512-key tiles; the Triton interpreter's tiles are 16 to 64 wide.
    N = 40 takes the kernels' general path, N = 3 their decode path."""
    g = torch.Generator().manual_seed(seed)
    B, H, D = 1, 2, 16
    ts = [torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (N, N, N, M, M)]
    which, index = NAN_PLACES[where]
    ts[which][index(M)] = NAN
    dout = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    return (*ts, dout)


# NaN handling does not depend on the dtype but the CPU paths do (bfloat16 has its own packed products).
NAN_RUNS = [(p, d) for p in PATHS for d in (torch.float64, torch.float32)] + [(("cpu", None), torch.bfloat16)]


@needs_ext
@pytest.mark.parametrize("n", [40, 3])
@pytest.mark.parametrize("window", [None, 3, 70])
@pytest.mark.parametrize("where", list(NAN_PLACES))
@pytest.mark.parametrize("path,dtype", NAN_RUNS,
                         ids=[p[0] + (f"-{p[1]}" if p[1] else "") + f"-{str(d)[6:]}" for p, d in NAN_RUNS])
def test_nan_reaches_the_rows_it_affects(path, where, window, n, dtype, monkeypatch):
    backend, tiles = path
    if tiles:
        monkeypatch.setenv("LONGKERNELS_CPU_TILES", tiles)
    seed = case_seed(where, window, n)
    inputs = _nan_inputs(where, seed, 600 if backend == "cpu" else 100, n)
    exact = _rowwise(inputs, window=window)
    ref = _run("reference", inputs, dtype, window=window)
    got = _run(backend, inputs, dtype, window=window)
    for name, e, r, x in zip(NAMES, exact, ref, got):
        must, may = torch.isnan(e), torch.isnan(r)
        assert bool((torch.isnan(x) | ~must).all()), f"{name}: a NaN the math gives is missing (seed {seed})"
        assert bool((~torch.isnan(x) | may).all()), f"{name}: NaN where the reference is finite (seed {seed})"
        both = ~torch.isnan(x) & ~may
        if dtype == torch.float64 and both.any():
            assert rel_err(x[both], r[both]) <= FLOAT64_RTOL * 10, f"{name} (seed {seed})"


@needs_ext
@pytest.mark.parametrize("magnitude", [1e3, 1e4, 3e4])
@pytest.mark.parametrize("path", PATHS, ids=lambda p: p[0] + (f"-{p[1]}" if p[1] else ""))
def test_huge_logits_keep_gradients_finite_and_bounded(path, magnitude, monkeypatch):
    """|scale q.k| up to ~1e7 in float32: the LSE's last bit is worth more than 1, so exp(s - lse) recomputed
    in the backward can exceed 1 unless clamped (it reached 6e27 in the gradients before)."""
    backend, tiles = path
    if tiles:
        monkeypatch.setenv("LONGKERNELS_CPU_TILES", tiles)
    seed = case_seed("huge", magnitude)
    g = torch.Generator().manual_seed(seed)
    B, H, N, M, D = 1, 2, 70, 90, 16
    q = torch.randn(B, H, N, D, generator=g) * magnitude
    k, mk = (torch.randn(B, H, n, D, generator=g) * magnitude / 10 for n in (N, M))
    v, mv = (torch.randn(B, H, n, D, generator=g) for n in (N, M))
    dout = torch.randn(B, H, N, D, generator=g)
    inputs = (q, k, v, mk, mv, dout)
    ref = _run("reference", inputs, torch.float64, window=None)
    ref32 = _run("reference", inputs, torch.float32, window=None)
    got = _run(backend, inputs, torch.float32, window=None)
    bound = 1.5 * max(r.abs().max().item() for r in ref[2:])
    for name, x in zip(NAMES[2:], got[2:]):
        assert torch.isfinite(x).all(), f"{name} is not finite (seed {seed})"
        assert x.abs().max().item() <= bound, f"{name}: {x.abs().max().item():.3g} > {bound:.3g} (seed {seed})"
    # logits of ~1e5 carry float32 errors of ~1e-2: the output is held to the low-precision rule
    assert rel_err(got[0], ref[0]) <= 2 * rel_err(ref32[0], ref[0]) + 1e-6, f"out (seed {seed})"


# --------------------------------------------------------------------------------------------
# LSH attention
# --------------------------------------------------------------------------------------------
LSH_BACKENDS = ["cpu"] + (["triton"] if HAS_TRITON else [])


@needs_ext
@pytest.mark.parametrize("where", ["qk", "rotations", "both"])
@pytest.mark.parametrize("backend", LSH_BACKENDS)
def test_lsh_nan_hashes_like_the_reference(where, backend):
    seed = case_seed("lsh nan", where)
    g = torch.Generator().manual_seed(seed)
    B, H, L, D, nh, nb = 2, 2, 64, 16, 2, 8
    qk = torch.randn(B, H, L, D, generator=g)
    v = torch.randn(B, H, L, D, generator=g)
    rot = torch.randn(H, D, nh, nb // 2, generator=g)
    if where in ("qk", "both"):
        qk[0, 0, 7, 3] = NAN
        qk[1, 1, 40] = NAN
    if where in ("rotations", "both"):
        rot[1, 4, 0, 2] = NAN
    buckets = lsh_hash(qk, rot, padding_mask(B, L, L, None, qk.device))
    got, _ = hash_sort(qk, rot, None, nb, L)
    assert torch.equal(got.long(), buckets.long()), f"buckets differ from torch.argmax's (seed {seed})"
    kw = dict(n_hashes=nh, chunk_size=16, n_buckets=nb, rotations=rot, causal=True)
    out = longkernels.lsh_attention(qk, v, backend=backend, **kw)
    ref = longkernels.lsh_attention(qk.double(), v.double(), backend="reference", **kw)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"NaN rows differ (seed {seed})"
    fine = ~torch.isnan(ref)
    assert fine.any() and rel_err(out[fine], ref[fine]) < 1e-5, f"other tokens moved (seed {seed})"


# --------------------------------------------------------------------------------------------
# Integers beyond what the kernels take
# --------------------------------------------------------------------------------------------
def _mem(**kw):
    g = torch.Generator().manual_seed(case_seed("ints"))
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g) for _ in range(3))
    return longkernels.memory_attention(q, k, v, **kw)


def test_window_beyond_int64_is_a_value_error():
    with pytest.raises(ValueError, match="window"):
        _mem(window=2**70)
    with pytest.raises(ValueError, match="window"):
        _mem(window=2**63)


@needs_ext
def test_window_longer_than_the_keys_is_no_window():
    for w in (9, 10**6, 2**63 - 1):
        assert torch.equal(_mem(window=w, backend="cpu"), _mem(backend="cpu"))


@pytest.mark.parametrize("name,value", [("chunk_size", 2**40), ("n_buckets", 2**40), ("n_hashes", 2**40),
                                        ("n_chunks_before", 2**40), ("n_chunks_after", 2**70)])
def test_lsh_integers_beyond_the_kernels_are_value_errors(name, value):
    g = torch.Generator().manual_seed(case_seed("lsh ints", name))
    qk, v = (torch.randn(1, 2, 32, 8, generator=g) for _ in range(2))
    kw = dict(n_hashes=2, chunk_size=8)
    kw[name] = value
    with pytest.raises(ValueError, match=name):
        longkernels.lsh_attention(qk, v, **kw)


@needs_ext
def test_lsh_chunk_longer_than_the_sequence_is_one_chunk():
    g = torch.Generator().manual_seed(case_seed("lsh long chunk"))
    qk, v = (torch.randn(1, 2, 20, 8, generator=g, dtype=torch.float64) for _ in range(2))
    rot = torch.randn(2, 8, 2, 1, generator=g)
    a = longkernels.lsh_attention(qk, v, n_hashes=2, chunk_size=2**30, rotations=rot, backend="cpu")
    b = longkernels.lsh_attention(qk, v, n_hashes=2, chunk_size=20, rotations=rot, backend="reference")
    c = longkernels.lsh_attention(qk, v, n_hashes=2, chunk_size=32, rotations=rot, backend="reference")
    assert rel_err(a, b) < 1e-12 and rel_err(b, c) < 1e-12
