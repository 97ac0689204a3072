"""Padding and document masks, rows with no visible key, softcap and sinks (docs/semantics.md §1), in
every fast path against the reference: output, LSE and every gradient (q, k, v, memory, sinks).

Each option alone and combined with the others and with window, GQA, ALiBi, memory and strided inputs;
the CPU's prefill tiles (float32 / bf16 micro-kernels, BLAS, AVX2), its decode path and the Triton kernels
(under TRITON_INTERPRET=1) and Triton's decode kernels. Tolerances: longkernels/testing.py.
"""
import math
import os

import pytest
import torch

import longkernels
from longkernels import reference
from longkernels.testing import Case, case_seed, compare

from conftest import HAS_CUDA

MASK_CASES = [
    Case(N=33, M=17, D=16, padding="right"),
    Case(B=2, N=40, M=29, D=32, H=4, Hkv=2, padding="left"),
    Case(B=2, N=37, M=21, D=16, padding="random", window=9),
    Case(B=2, N=30, M=12, D=16, padding="rows"),
    Case(N=29, M=0, D=16, mem=False, padding="rows", causal=False),
    Case(B=2, N=45, M=20, D=16, docs=3),
    Case(B=2, N=50, M=30, D=64, H=4, Hkv=1, docs=4, window=20, alibi=True),
    Case(N=38, M=19, D=16, docs=2, causal=False),
    Case(B=2, N=41, M=17, D=32, docs=3, padding="random", H=4, Hkv=2),
    Case(N=35, M=18, D=16, softcap=5.0),
    Case(N=35, M=18, D=80, Dv=48, softcap=2.0, alibi=True, window=11),
    Case(N=33, M=17, D=16, H=4, Hkv=2, sinks=True),
    Case(B=2, N=30, M=12, D=16, padding="rows", sinks=True),
    Case(B=2, N=35, M=18, D=16, H=4, Hkv=2, strided=True, padding="left", docs=2, softcap=8.0, sinks=True,
         window=13),
    Case(N=1, M=40, D=16, padding="random", sinks=True),
]
# Larger than the CPU kernels' tiles (256 x 512 forward, 128 x 128 backward): padding runs and document
# boundaries inside tiles, tiles wholly padded or outside every document, skipped and cut tiles.
BIG_MASK_CASES = [
    Case(N=600, M=700, D=64, H=2, Hkv=1, padding="left"),
    Case(B=2, N=530, M=300, D=32, docs=5, window=300),
    Case(N=700, M=0, D=32, mem=False, docs=7, padding="random", softcap=10.0, sinks=True),
]
# Few queries: the CPU decode path and Triton's split-KV decode.
DECODE_MASK_CASES = [
    Case(B=2, N=1, M=3000, D=64, H=8, Hkv=2, padding="left"),
    Case(B=2, N=3, M=1500, D=32, H=4, Hkv=4, padding="random", softcap=6.0, sinks=True),
    Case(B=2, N=16, M=1200, D=64, H=4, Hkv=1, docs=3, window=700),
    Case(N=2, M=900, D=16, H=2, Hkv=1, padding="rows", sinks=True),
]


def _check(case, backend, dtype, device="cpu"):
    seed = case_seed(case, str(dtype), backend, os.environ.get("LONGKERNELS_CPU_TILES"))
    rows = compare(case, backend, dtype, device=device, seed=seed)
    bad = [f"{name}: err {err:.2e} > {allowed:.2e}" for name, err, allowed, ok in rows if not ok]
    assert not bad, f"{backend} {dtype} {case.describe()} (seed {seed}): " + "; ".join(bad)


@pytest.mark.parametrize("case", MASK_CASES + BIG_MASK_CASES + DECODE_MASK_CASES, ids=Case.describe)
def test_cpu_float64(case):
    _check(case, "cpu", torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [MASK_CASES[1], MASK_CASES[6], MASK_CASES[8], MASK_CASES[10], MASK_CASES[13],
                                  BIG_MASK_CASES[0], BIG_MASK_CASES[2]] + DECODE_MASK_CASES, ids=Case.describe)
def test_cpu_low_precision(case, dtype):
    _check(case, "cpu", dtype)


@pytest.mark.parametrize("tiles", ["blas", "avx2"])
@pytest.mark.parametrize("case", [MASK_CASES[8], MASK_CASES[13], BIG_MASK_CASES[2], DECODE_MASK_CASES[1]],
                         ids=Case.describe)
def test_cpu_twins(case, tiles, monkeypatch):
    monkeypatch.setenv("LONGKERNELS_CPU_TILES", tiles)
    for dtype in (torch.float32, torch.float64):
        _check(case, "cpu", dtype)


@pytest.mark.parametrize("case", MASK_CASES, ids=Case.describe)
def test_triton_interpreter_float64(case):
    _check(case, "triton", torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [MASK_CASES[8], MASK_CASES[13],
                                  Case(B=2, N=3, M=200, D=32, H=4, Hkv=4, padding="random", softcap=6.0, sinks=True)],
                         ids=Case.describe)
def test_triton_interpreter_low_precision(case, dtype):
    _check(case, "triton", dtype)


# Softcap on small logits (head dims of 1 and 2: dot products near 0) in float32: tanh as 2 sigmoid(2x) - 1
# alone cancels near 0, leaving cap times float32's round-off in every capped logit (7 of 80 such
# comparisons over the rule); the kernels take an odd polynomial there, as the CPU's tanh_approx does.
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_softcap_small_logits_float32(backend):
    for i in range(12):
        case = Case(N=1 + i % 5, M=(7 * i) % 40, D=1 + i % 2, H=3, Hkv=3, softcap=30.0)
        _check(case, backend, torch.float32)


@pytest.mark.parametrize("case", [Case(N=3, M=300, D=16, H=4, Hkv=2, padding="left", sinks=True),
                                  Case(B=2, N=16, M=200, D=32, H=4, Hkv=1, docs=3, softcap=4.0),
                                  Case(N=1, M=100, D=16, padding="rows")], ids=Case.describe)
def test_triton_interpreter_decode(case):
    _check(case, "triton", torch.float64)


# --------------------------------------------------------------------------------------------
# The semantics themselves, on small hand-made inputs (the reference and the kernels alike).
# --------------------------------------------------------------------------------------------
BACKENDS = ["reference", "cpu", "triton"]


def _qkv(B=1, H=2, N=6, M=4, D=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, H, N, D, generator=g, dtype=dtype) for _ in range(2))
    mk, mv = (torch.randn(B, H, M, D, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v, mk, mv


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_with_no_visible_key_is_zero_with_lse_minus_inf_and_no_gradient(backend):
    q, k, v, mk, mv = (t.requires_grad_() for t in _qkv())
    pad = torch.zeros(1, 10, dtype=torch.bool)
    pad[0, :6] = True  # memory (4) and the first two queries' own keys: queries 0 and 1 see nothing
    out, lse = longkernels.memory_attention(q, k, v, mk, mv, key_padding_mask=pad, return_lse=True, backend=backend)
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    assert torch.isneginf(lse[:, :, :2]).all() and torch.isfinite(lse[:, :, 2:]).all()
    out.sum().backward()
    for t in (q, k, v, mk, mv):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, :2], torch.zeros_like(q.grad[:, :, :2]))
    assert torch.equal(mk.grad, torch.zeros_like(mk.grad)) and torch.equal(mv.grad, torch.zeros_like(mv.grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_documents_match_separate_calls(backend):
    # Two packed documents attend exactly as two separate calls would.
    q, k, v, _, _ = _qkv(N=10, M=0)
    ids = torch.tensor([[0] * 4 + [1] * 6])
    out = longkernels.memory_attention(q, k, v, document_ids=ids, backend=backend)
    first = longkernels.memory_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], backend="reference")
    second = longkernels.memory_attention(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], backend="reference")
    torch.testing.assert_close(out, torch.cat([first, second], dim=2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_document_continuing_from_memory_stays_visible(backend):
    q, k, v, mk, mv = _qkv(N=6, M=4)
    # Memory holds the end of document 0 and the start of document 1; the segment continues document 1.
    ids = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 2, 2, 2]])
    out = longkernels.memory_attention(q, k, v, mk, mv, document_ids=ids, backend=backend)
    keys, vals = torch.cat([mk, k], 2), torch.cat([mv, v], 2)
    # Query 0 (position 4, document 1) sees keys 2, 3, 4; query 3 (position 7, document 2) sees key 7 only.
    want0 = reference.memory_attention(q[:, :, :1], keys[:, :, 2:5], vals[:, :, 2:5], causal=False)
    torch.testing.assert_close(out[:, :, :1], want0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:, :, 3], v[:, :, 3], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_formula(backend):
    q, k, v, mk, mv = _qkv()
    q = q * 20  # logits well past the cap
    out = longkernels.memory_attention(q, k, v, mk, mv, softcap=3.0, causal=False, backend=backend)
    s = torch.matmul(q, torch.cat([mk, k], 2).transpose(-1, -2)) * q.shape[-1] ** -0.5
    want = torch.softmax(3.0 * torch.tanh(s / 3.0), -1) @ torch.cat([mv, v], 2)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_formula_and_gradient(backend):
    q, k, v, mk, mv = _qkv()
    sinks = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    out, lse = longkernels.memory_attention(q, k, v, mk, mv, causal=False, sinks=sinks, return_lse=True,
                                            backend=backend)
    s = torch.matmul(q, torch.cat([mk, k], 2).transpose(-1, -2)) * q.shape[-1] ** -0.5
    full = torch.cat([s, sinks.detach().view(1, 2, 1, 1).expand(1, 2, 6, 1)], -1)
    want = torch.softmax(full, -1)[..., :-1] @ torch.cat([mv, v], 2)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(full, -1), rtol=1e-12, atol=1e-12)
    if backend == "triton":  # its sink gradient is held to the reference's by the parity cases (interpreter: slow)
        return
    assert torch.autograd.gradcheck(
        lambda sk: longkernels.memory_attention(q, k, v, mk, mv, causal=False, sinks=sk, backend=backend),
        (sinks,), eps=1e-6, atol=1e-8)


def test_all_false_padding_mask_changes_nothing():
    q, k, v, mk, mv = _qkv()
    a = longkernels.memory_attention(q, k, v, mk, mv)
    b = longkernels.memory_attention(q, k, v, mk, mv, key_padding_mask=torch.zeros(1, 10, dtype=torch.bool))
    assert torch.equal(a, b)


@pytest.mark.parametrize("over, exc, msg", [
    (dict(key_padding_mask=torch.zeros(1, 9, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
    (dict(key_padding_mask=torch.zeros(1, 10)), TypeError, "key_padding_mask must be bool"),
    (dict(key_padding_mask=[[False] * 10]), TypeError, "key_padding_mask must be a bool torch.Tensor"),
    (dict(document_ids=torch.zeros(1, 10)), TypeError, "document_ids must be an integer"),
    (dict(document_ids=torch.zeros(2, 10, dtype=torch.long)), ValueError, "document_ids must have shape"),
    (dict(document_ids=torch.tensor([[0, 0, 1, 1, 0, 2, 2, 2, 2, 2]])), ValueError, "non-decreasing"),
    (dict(softcap=0.0), ValueError, "softcap must be > 0"),
    (dict(softcap=-1.0), ValueError, "softcap must be > 0"),
    (dict(softcap=math.inf), TypeError, "softcap must be a finite number"),
    (dict(softcap="1"), TypeError, "softcap must be a finite number"),
    (dict(sinks=torch.zeros(3)), ValueError, "sinks must have shape"),
    (dict(sinks=torch.zeros(2, dtype=torch.long)), TypeError, "sinks must be floating"),
    (dict(sinks=[0.0, 0.0]), TypeError, "sinks must be a torch.Tensor"),
])
def test_bad_mask_arguments(over, exc, msg):
    q, k, v, mk, mv = _qkv()
    with pytest.raises(exc, match=msg):
        longkernels.memory_attention(q, k, v, mk, mv, **over)


_ON_GPU = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none on this machine); the CPU op's twin runs")


@pytest.mark.parametrize("op, device", [("memory_attention_fwd", "cpu"), ("memory_attention_fwd_triton", "cpu"),
                                        pytest.param("memory_attention_fwd", "cuda", marks=[_ON_GPU, pytest.mark.gpu])])
def test_registered_ops_check_masks(op, device):
    q, k, v, mk, mv = (t.to(device) for t in _qkv())
    f = getattr(torch.ops.longkernels, op)
    base = (q, k, v, mk, mv, None, True, 0, 0.35)
    with pytest.raises(RuntimeError, match="key_padding_mask"):
        f(*base, torch.zeros(1, 9, dtype=torch.bool, device=device))
    with pytest.raises(RuntimeError, match="document_ids"):
        f(*base, None, torch.zeros(1, 10, device=device))
    with pytest.raises(RuntimeError, match="softcap"):
        f(*base, None, None, -1.0)
    with pytest.raises(RuntimeError, match="sinks"):
        f(*base, None, None, 0.0, torch.zeros(5, device=device))
    ids = torch.tensor([[0, 0, 1, 1, 0, 2, 2, 2, 2, 2]], device=device)
    if device == "cpu" and op == "memory_attention_fwd":  # the C++ op refuses ids that decrease (its bounds need it)
        with pytest.raises(RuntimeError, match="non-decreasing"):
            f(*base, None, ids)
    elif device == "cuda":  # the CUDA kernels test ids pair by pair: equality, what the reference computes
        out, lse = f(*base, None, ids)
        want, want_lse = reference.memory_attention(q, k, v, mk, mv, scale=0.35, document_ids=ids, return_lse=True)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)


def test_cuda_backend_reasons_are_about_the_device_only():
    # The CUDA kernels take every option: on CPU tensors their only reason is the device (or a missing build).
    from longkernels.ops.memory_attention import not_supported_reasons
    q = torch.zeros(1, 1, 1, 8)
    reasons = not_supported_reasons("cuda", q, q)
    assert reasons and not any(m in r for r in reasons for m in ("key_padding_mask", "document_ids", "softcap", "sinks"))


# --------------------------------------------------------------------------------------------
# GPU: the same parity on CUDA tensors, for the Triton kernels and the compiled CUDA kernels. The CPU twins
# are the tests above (C++ kernels, Triton interpreter); the CUDA kernels' row end (rows::finish_row) and
# schedule are checked on the host by csrc/tests/test_cuda_host_logic.cpp.
# --------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none on this machine); CPU twins: test_cpu_* and "
                                              "test_triton_interpreter_* above")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_gpu_cuda_kernels(dtype):
    for case in MASK_CASES + BIG_MASK_CASES + DECODE_MASK_CASES:
        _check(case, "cuda", dtype, device="cuda")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [MASK_CASES[8], MASK_CASES[13], BIG_MASK_CASES[2], DECODE_MASK_CASES[1]],
                         ids=Case.describe)
def test_gpu_triton(case, dtype):
    # A few cases that combine every option (each variant is a Triton compile: make gpu-check's budget is minutes);
    # the interpreter runs every case on the CPU above. One test per case: make gpu-check runs them in parallel.
    _check(case, "triton", dtype, device="cuda")
