"""Block pairs at any relative position (``q_offset``: query i at ``q_offset + i``), the ring's building block
(docs/semantics.md §8), on every CPU path and the Triton kernels under the interpreter, against the
reference: output, LSE and the gradients of q, k, v (through the output and the LSE)."""
from __future__ import annotations

import os

import pytest
import torch

from longkernels import _ext
from longkernels.ops.memory_attention import block_attention
from longkernels.reference.memory_attention import memory_attention as reference
from longkernels.testing import case_seed, failures

from conftest import HAS_CUDA

# (N, H, Hkv, D, Dv, causal, window, alibi, q_offset, padding)
CASES = [
    (1, 2, 2, 16, 16, True, None, False, 0, False),       # length 1, the diagonal
    (37, 2, 1, 12, 20, True, None, True, 37, False),      # the previous block, GQA, D not a power of 2
    (130, 4, 2, 16, 16, True, 40, False, 130, False),     # window edge inside the previous block
    (130, 2, 2, 16, 16, True, 40, True, 300, False),      # far behind: the window hides every key
    (130, 2, 2, 16, 16, True, 200, True, 190, True),      # a partial block behind, padded keys
    (70, 2, 1, 32, 32, False, None, True, -70, False),    # a later block (non-causal)
    (70, 2, 2, 16, 16, False, 30, False, -20, True),      # non-causal window, overlapping positions
    (257, 2, 2, 64, 64, True, None, False, 5, False),     # shifted diagonal: rows see a few more keys
]


def _ids(c):
    return "N{}-H{}/{}-D{}/{}-{}-w{}{}-off{}{}".format(*c[:5], "causal" if c[5] else "full", c[6],
                                                       "-alibi" if c[7] else "", c[8], "-pad" if c[9] else "")


def _inputs(c, dtype, seed, strided=False):
    N, H, Hkv, D, Dv = c[:5]
    g = torch.Generator().manual_seed(seed)

    def rnd(h, d):
        if strided:  # (B, N, h, d) memory, seen as (B, h, N, d)
            return torch.randn(2, N, h, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
        return torch.randn(2, h, N, d, generator=g, dtype=torch.float64).to(dtype)

    q, k, v = rnd(H, D), rnd(Hkv, D), rnd(Hkv, Dv)
    slopes = torch.rand(H, generator=g, dtype=torch.float64) * 0.3 if c[7] else None
    kpm = (torch.rand(2, N, generator=g) < 0.3) if c[9] else None
    dout = torch.randn(2, H, N, Dv, generator=g, dtype=torch.float64)
    dlse = torch.randn(2, H, N, generator=g, dtype=torch.float64)
    return q, k, v, slopes, kpm, dout, dlse


def _run(fn, c, q, k, v, slopes, kpm, dout, dlse, cdt):
    q, k, v = (t.detach().to(cdt).requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, slopes, kpm)
    loss = (out.double() * dout).sum() + (lse.double().masked_fill(torch.isinf(lse), 0) * dlse).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v), allow_unused=True)
    return {"out": out.detach(), "lse": lse.detach(), "dq": dq, "dk": dk, "dv": dv}


def _check(c, dtype, backend, strided=False, device="cpu"):
    seed = case_seed(c, str(dtype), backend, strided, os.environ.get("LONGKERNELS_CPU_TILES"))
    q, k, v, slopes, kpm, dout, dlse = (None if t is None else t.to(device)
                                        for t in _inputs(c, dtype, seed, strided))
    kw = dict(q_offset=c[8], causal=c[5], window=c[6])

    def fast(q, k, v, s, m):
        return block_attention(q, k, v, alibi_slopes=s, key_padding_mask=m, backend=backend, **kw)

    def ref(q, k, v, s, m):
        return reference(q, k, v, alibi_slopes=s, key_padding_mask=m, return_lse=True, causal=c[5], window=c[6],
                         q_offset=c[8])

    got = _run(fast, c, q, k, v, slopes, kpm, dout, dlse, dtype)
    truth = _run(ref, c, q, k, v, slopes, kpm, dout, dlse, torch.float64)
    lowp = None if dtype == torch.float64 else _run(ref, c, q, k, v, slopes, kpm, dout, dlse, dtype)
    bad = failures(truth, got, lowp, dtype)
    assert not bad, f"{backend} {dtype} {_ids(c)} (seed {seed}): " + "; ".join(bad)


@pytest.mark.parametrize("c", CASES, ids=_ids)
def test_cpu_float64(c):
    _check(c, torch.float64, "cpu")
    _check(c, torch.float64, "cpu", strided=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", CASES, ids=_ids)
def test_cpu_low_precision(c, dtype):
    _check(c, dtype, "cpu")


@pytest.mark.parametrize("tiles", ["blas", "avx2"])
@pytest.mark.parametrize("c", [CASES[i] for i in (1, 4, 6, 7)], ids=_ids)
def test_cpu_twins(c, tiles, monkeypatch):
    # The portable BLAS tiles and the AVX2 micro-kernels, on a machine that would take its AVX-512 ones.
    if tiles == "avx2" and _ext.available() and not _ext.build_info().get("cpu_avx2_fma"):
        pytest.skip("this CPU has no AVX2 + FMA: the AVX2 tile products cannot run here")
    monkeypatch.setenv("LONGKERNELS_CPU_TILES", tiles)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        _check(c, dtype, "cpu")


@pytest.mark.parametrize("c", [CASES[i] for i in (1, 4, 5)], ids=_ids)
def test_triton_interpreter_float64(c):
    _check(c, torch.float64, "triton")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none on this machine); CPU twins: test_cpu_* and "
                                         "test_triton_interpreter_float64 above")
@pytest.mark.gpu
@pytest.mark.parametrize("backend, dtype", [("cuda", torch.float64), ("cuda", torch.float32), ("cuda", torch.bfloat16),
                                            ("triton", torch.float32)], ids=str)
def test_gpu(backend, dtype):
    # Triton in one dtype: each variant is a compile, and make gpu-check's budget is minutes.
    for c in CASES:
        _check(c, dtype, backend, device="cuda")
        _check(c, dtype, backend, strided=True, device="cuda")


def test_diagonal_equals_memory_attention():
    import longkernels

    q, k, v = (torch.randn(1, 2, 50, 16, dtype=torch.float64) for _ in range(3))
    o1, l1 = block_attention(q, k, v, q_offset=0, window=7)
    o2, l2 = longkernels.memory_attention(q, k, v, window=7, return_lse=True)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)


def test_rows_that_see_nothing():
    # q_offset far behind with a window: every row sees no key: out 0, LSE -inf, zero gradients, no NaN.
    q, k, v = (torch.randn(1, 2, 20, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = block_attention(q, k, v, q_offset=100, window=10)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    (out.sum() + lse.masked_fill(torch.isinf(lse), 0).sum()).backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("bad, err, match", [
    (dict(q_offset=1.5), TypeError, "q_offset must be an int"),
    (dict(q_offset=True), TypeError, "q_offset must be an int"),
    (dict(q_offset=2**31), ValueError, "q_offset must lie in"),
    (dict(q_offset=0, window=0), ValueError, "window must be >= 1"),
    (dict(q_offset=0, key_padding_mask=torch.zeros(1, 5, dtype=torch.bool)), ValueError, "key_padding_mask"),
])
def test_bad_input(bad, err, match):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(err, match=match):
        block_attention(q, q, q, **bad)


@pytest.mark.parametrize("op_name, too_far, match", [
    ("memory_attention_fwd", 2**60, "q_offset must lie in"),                  # C++: int64 positions, |q0| <= 2^52
    ("memory_attention_fwd_triton", 2**31, "q_offset must be an int in"),     # Triton: int32 positions
])
def test_op_checks_q_offset(op_name, too_far, match):
    # The registered ops check what their memory safety depends on, whoever calls them.
    if op_name == "memory_attention_fwd" and not _ext.available():
        pytest.skip("the C++ extension is not built")
    q = torch.randn(1, 2, 4, 8)
    e = q[:, :, :0]
    op = getattr(torch.ops.longkernels, op_name)
    with pytest.raises(RuntimeError, match=match):
        op(q, q, q, e, e, None, True, 0, 1.0, None, None, 0.0, None, too_far)
    with pytest.raises(RuntimeError, match="document_ids need the queries"):
        op(q, q, q, e, e, None, True, 0, 1.0, None, torch.zeros(1, 4, dtype=torch.long), 0.0, None, 3)
    out, lse = op(q, q, q, e, e, None, True, 0, 1.0, None, None, 0.0, None, -(2**30))  # within both bounds
    assert bool(torch.isneginf(lse).all()) and not out.any()  # every key lies after every query
