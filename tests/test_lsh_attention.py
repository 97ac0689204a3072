"""LSH attention: every backend against the reference (docs/semantics.md §2).

Inputs are drawn from a seed made of the case's id (``longkernels.testing.case_seed``: the same in every
run, different per case) and printed on failure. Tolerances: longkernels/testing.py.
"""
import math

import pytest
import torch

import longkernels
from longkernels import _ext
from longkernels.ops import lsh_attention as lsh_ops
from longkernels.reference import lsh_attention as reference
from longkernels.reference.lsh_attention import (default_n_buckets, lsh_hash, lsh_sort, normalize_keys,
                                                 padded_length, padding_mask, total_buckets)
from longkernels.testing import LSHCase, case_seed, compare, make_lsh_inputs, rel_err, run_lsh

from conftest import HAS_CUDA

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"C++ extension not built: {_ext.LOAD_ERROR}")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none on this machine); the CPU twin "
                                                     "runs the same comparison on the C++ and Triton-interpreter paths")

CASES = [
    LSHCase(),
    LSHCase(L=1, chunk_size=8),  # one token: it sees only itself
    LSHCase(L=5, chunk_size=8, causal=True),  # shorter than one chunk
    LSHCase(L=64, chunk_size=16, n_hashes=1, n_buckets=8, causal=True),
    LSHCase(L=37, chunk_size=8, n_hashes=3, n_buckets=6, padding=True),  # L not a multiple of the chunk
    LSHCase(B=2, L=50, chunk_size=12, causal=True, padding=True),  # chunk not a power of two
    LSHCase(L=48, D=32, Dv=24, chunk_size=8, before=2, after=1),
    LSHCase(L=40, chunk_size=8, before=0, after=0, causal=True),
    LSHCase(L=33, D=24, chunk_size=8, strided=True, causal=True),  # D not a power of two, strided
    LSHCase(L=32, D=64, chunk_size=16, n_hashes=2, n_buckets=2, after=1),
    LSHCase(H=1, L=24, D=128, chunk_size=8, n_hashes=2, n_buckets=4, causal=True, padding=True),
    LSHCase(L=16, chunk_size=4, n_hashes=4, n_buckets=8, before=3, after=2),  # window wraps several times
]
TRITON_CASES = [CASES[i] for i in (0, 2, 4, 5, 8)]
# Factorised bucket counts (trax's and HF's form): one rotation block per factor, bucket b1 + n1 * b2 + ...
FACTORED_CASES = [
    LSHCase(L=64, chunk_size=8, n_hashes=2, n_buckets=(4, 4)),
    LSHCase(B=2, L=50, chunk_size=12, causal=True, padding=True, n_buckets=(2, 4, 2)),
    LSHCase(L=40, D=24, chunk_size=8, n_hashes=3, n_buckets=(6,), strided=True),
]


def _seed(*key):
    return case_seed(*key)


def _check(case, backend, dtype, **kw):
    seed = _seed(case, str(dtype), backend)
    rows = compare(case, backend, dtype, seed=seed, **kw)
    bad = [f"{name}: {err:.2e} > {allowed:.2e}" for name, err, allowed, ok in rows if not ok]
    assert not bad, f"{backend} {case.describe()} {dtype} (seed {seed}): " + "; ".join(bad)


# --------------------------------------------------------------------------------------------
# Parity: C++ CPU kernels
# --------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.describe())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_cpu_matches_reference(case, dtype):
    _check(case, "cpu", dtype)


@needs_ext
@pytest.mark.parametrize("case", FACTORED_CASES, ids=lambda c: c.describe())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpu_factorised_buckets_match_reference(case, dtype):
    _check(case, "cpu", dtype)


def test_triton_interpreter_factorised_buckets():
    if lsh_ops.not_supported_reasons("triton", torch.empty(1, 1, 1, 16), torch.empty(1, 1, 1, 16)):
        pytest.skip("Triton does not run here (needs TRITON_INTERPRET=1 on CPU)")
    _check(FACTORED_CASES[1], "triton", torch.float64)


@needs_ext
@pytest.mark.parametrize("case", CASES[:6], ids=lambda c: c.describe())
def test_cpu_portable_products_match_reference(case, monkeypatch):
    """The plain-loop tile products (CPUs with neither AVX-512 nor AVX2), on any machine."""
    monkeypatch.setenv("LONGKERNELS_CPU_TILES", "blas")
    _check(case, "cpu", torch.float32)
    _check(case, "cpu", torch.float64)


@needs_ext
@pytest.mark.skipif(_ext.available() and not _ext.build_info().get("cpu_avx2_fma"),
                    reason="this CPU has no AVX2 + FMA: the AVX2 tile products cannot run here")
@pytest.mark.parametrize("case", CASES[:6], ids=lambda c: c.describe())
def test_cpu_avx2_products_match_reference(case, monkeypatch):
    """The AVX2 tile products (CPUs without AVX-512), also on a machine that has AVX-512."""
    monkeypatch.setenv("LONGKERNELS_CPU_TILES", "avx2")
    _check(case, "cpu", torch.float32)


@needs_ext
def test_cpu_self_only_rows_are_exact_in_float32():
    """Position 0 of a causal sequence sees only itself in every round: its output is v_0 exactly,
    although its logits sit at -1e5 where float32's spacing is 0.008 (the two-part LSE)."""
    case = LSHCase(L=40, chunk_size=8, causal=True)
    qk, v, rot, _, _, _ = make_lsh_inputs(case, torch.float32, seed=_seed("self-only"))
    out = longkernels.lsh_attention(qk, v, n_hashes=2, chunk_size=8, n_buckets=4, causal=True, rotations=rot,
                                    backend="cpu")
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0], rtol=2e-7, atol=0)


# --------------------------------------------------------------------------------------------
# Parity: Triton (under the interpreter on this machine)
# --------------------------------------------------------------------------------------------
def _triton_reasons():
    return lsh_ops.not_supported_reasons("triton", torch.empty(1, 1, 1, 16), torch.empty(1, 1, 1, 16))


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.describe())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_triton_matches_reference(case, dtype):
    reasons = _triton_reasons()
    if reasons:
        pytest.skip("; ".join(reasons))
    _check(case, "triton", dtype)


def test_triton_interpreter_gpu_combine_block(monkeypatch):
    # The rounds' combination steps 16 positions under the interpreter and 64 on a GPU: lengths that are
    # multiples of neither, several rounds, padding.
    reasons = _triton_reasons()
    if reasons:
        pytest.skip("; ".join(reasons))
    from longkernels.triton_kernels import lsh_attention as tl_lsh
    monkeypatch.setattr(tl_lsh, "INTERPRETER_BLOCK_L", tl_lsh.GPU_BLOCK_L)
    for case in (LSHCase(B=2, L=90, chunk_size=16, n_hashes=3, n_buckets=4, causal=True, padding=True), CASES[4]):
        _check(case, "triton", torch.float64)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.describe())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_triton_matches_reference(case, dtype):
    _check(case, "triton", dtype, device="cuda")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("case", [LSHCase(B=2, L=300, chunk_size=16, n_hashes=3, n_buckets=16, padding=True),
                                  LSHCase(L=37, chunk_size=8, n_hashes=3, n_buckets=6, padding=True),
                                  LSHCase(B=2, L=300, chunk_size=16, n_hashes=2, n_buckets=(8, 4, 2), padding=True),
                                  LSHCase(B=2, L=45, chunk_size=8, n_hashes=2, n_buckets=(4, 6), padding=True),
                                  LSHCase(B=1, H=2, L=512, D=32, chunk_size=64, n_hashes=1, n_buckets=(16, 32))],
                         ids=lambda c: c.describe())
def test_cuda_hash_sort_matches_reference(case):
    # Plain and factorised buckets (HF's default form); factors of n_i / 2 % 4 == 0 take the float4 loads.
    # The CPU twin is test_cpu_hash_sort_matches_reference, the fold's arithmetic csrc/tests/test_cuda_host_logic.cpp.
    assert lsh_ops.hash_sort_backend(torch.empty(0, device="cuda")) == "extension"
    _check_hash_sort(case, "cuda")


# --------------------------------------------------------------------------------------------
# Hash and sort
# --------------------------------------------------------------------------------------------
def _check_hash_sort(case, device):
    qk, _, rot, mask, _, _ = make_lsh_inputs(case, torch.float32, device=device, seed=_seed(case, "hash"))
    Lp = padded_length(case.L, case.chunk_size)
    buckets, perm = lsh_ops.hash_sort(qk, rot, mask, case.n_buckets, Lp)
    pad = padding_mask(case.B, case.L, Lp, mask, device)
    want_b = lsh_hash(torch.nn.functional.pad(qk.float(), (0, 0, 0, Lp - case.L)), rot, pad, case.n_buckets)
    want_p = lsh_sort(want_b, total_buckets(case.n_buckets), bool(pad.any())) % Lp
    assert buckets.dtype == perm.dtype == torch.int32
    assert torch.equal(buckets.long().cpu(), want_b.cpu())
    assert torch.equal(perm.long().flatten(2).cpu(), want_p.cpu())


@needs_ext
@pytest.mark.parametrize("case", [LSHCase(L=37, chunk_size=8, n_hashes=3, n_buckets=6, padding=True),
                                  LSHCase(B=2, H=3, L=700, D=32, chunk_size=32, n_hashes=2, n_buckets=32),
                                  LSHCase(L=1, chunk_size=4, n_hashes=1, n_buckets=2),
                                  LSHCase(B=2, L=300, chunk_size=16, n_hashes=2, n_buckets=(8, 4, 2), padding=True)],
                         ids=lambda c: c.describe())
def test_cpu_hash_sort_matches_reference(case):
    assert lsh_ops.hash_sort_backend(torch.empty(0)) == "extension"
    _check_hash_sort(case, "cpu")


def test_torch_hash_sort_fallback_matches_reference(monkeypatch):
    monkeypatch.setattr(lsh_ops, "hash_sort_backend", lambda qk: "torch")
    _check_hash_sort(LSHCase(B=2, L=45, chunk_size=8, n_hashes=2, n_buckets=8, padding=True), "cpu")
    _check_hash_sort(LSHCase(B=2, L=45, chunk_size=8, n_hashes=2, n_buckets=(4, 6), padding=True), "cpu")


@pytest.mark.parametrize("bad, exc, msg", [
    ((4, 3), ValueError, "each factor of n_buckets must be even"),
    ([], ValueError, "at least one factor"),
    ((4, 0), ValueError, "n_buckets must be >= 2"),
    ((4, "2"), TypeError, "n_buckets must be an int"),
])
def test_bad_bucket_factors(bad, exc, msg):
    qk = torch.randn(1, 2, 32, 16)
    with pytest.raises(exc, match=msg):
        longkernels.lsh_attention(qk, qk, n_hashes=1, chunk_size=8, n_buckets=bad)


def test_rotations_must_match_the_factors():
    qk = torch.randn(1, 2, 32, 16)
    with pytest.raises(ValueError, match=r"rotations must be \(H, D, n_hashes, 5\)"):
        longkernels.lsh_attention(qk, qk, n_hashes=1, chunk_size=8, n_buckets=[4, 6],
                                  rotations=torch.randn(2, 16, 1, 12))


def test_sort_order_is_bucket_then_position():
    """Within a round, positions ascend inside each bucket; rounds follow each other."""
    case = LSHCase(L=64, chunk_size=8, n_hashes=2, n_buckets=8)
    qk, _, rot, _, _, _ = make_lsh_inputs(case, torch.float32, seed=_seed("order"))
    buckets, perm = lsh_ops.hash_sort(qk, rot, None, 8, 64)
    for r in range(2):
        b = buckets[0, 0, r].long()[perm[0, 0, r].long()]
        p = perm[0, 0, r].long()
        key = b * 64 + p
        assert torch.all(key[1:] > key[:-1])


def test_default_n_buckets():
    assert default_n_buckets(16384, 64) == 512
    assert default_n_buckets(100, 64) == 2  # 2 * 100 / 64 = 3.1 -> 2
    assert default_n_buckets(10, 64) == 2  # at least 2
    assert default_n_buckets(1000, 64) == 16  # 31.25 -> 16


# --------------------------------------------------------------------------------------------
# The semantics' own checks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("causal", [False, True])
def test_reduces_to_full_attention(backend, causal):
    """One round, two buckets, one chunk covering the sequence: self-masked full attention over the
    normalised keys, whatever the hash does."""
    if backend == "cpu" and not _ext.available():
        pytest.skip(_ext.LOAD_ERROR)
    g = torch.Generator().manual_seed(_seed("full", causal))
    B, H, L, D = 2, 3, 29, 16
    qk = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, L, 12, generator=g, dtype=torch.float64)
    out = longkernels.lsh_attention(qk, v, n_hashes=1, n_buckets=2, chunk_size=32, causal=causal, backend=backend)
    s = qk @ normalize_keys(qk).transpose(-1, -2)
    pos = torch.arange(L)
    if causal:
        s = s.masked_fill(pos[None, :] > pos[:, None], -math.inf)
    s = s.masked_fill(torch.eye(L, dtype=torch.bool), -1e5)
    want = torch.softmax(s, dim=-1) @ v
    assert rel_err(out, want) < 1e-10


@needs_ext
def test_drawn_rotations_are_returned_and_replay():
    case = LSHCase(L=40, chunk_size=8)
    qk, v, _, _, _, _ = make_lsh_inputs(case, torch.float64, seed=_seed("draw"))
    out, rot = longkernels.lsh_attention(qk, v, n_hashes=2, chunk_size=8, n_buckets=4, return_rotations=True)
    assert rot.shape == (case.H, case.D, 2, 2) and rot.dtype == torch.float32
    again = longkernels.lsh_attention(qk, v, n_hashes=2, chunk_size=8, rotations=rot)  # n_buckets from rot
    assert torch.equal(out, again)
    ref = longkernels.lsh_attention(qk, v, n_hashes=2, chunk_size=8, rotations=rot, backend="reference")
    assert rel_err(out, ref) < 1e-10


# --------------------------------------------------------------------------------------------
# Autograd, compile, op registration
# --------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_cpu(causal):
    case = LSHCase(H=1, L=11, D=8, chunk_size=4, n_hashes=2, n_buckets=4, causal=causal, padding=True)
    qk, v, rot, mask, _, _ = make_lsh_inputs(case, torch.float64, seed=_seed("gradcheck", causal))
    qk.requires_grad_()
    v.requires_grad_()

    def fn(qk, v):
        return longkernels.lsh_attention(qk, v, n_hashes=2, chunk_size=4, n_buckets=4, causal=causal,
                                         rotations=rot, key_padding_mask=mask, return_lse=True, backend="cpu")

    assert torch.autograd.gradcheck(fn, (qk, v), eps=1e-6, atol=1e-7)


@needs_ext
def test_compile_fullgraph_cpu():
    case = LSHCase(L=40, chunk_size=8, causal=True)
    qk, v, rot, _, _, _ = make_lsh_inputs(case, torch.float32, seed=_seed("compile"))

    def fn(qk, v, rot):
        out, lse = longkernels.lsh_attention(qk, v, n_hashes=2, chunk_size=8, n_buckets=4, causal=True,
                                             rotations=rot, return_lse=True, backend="cpu")
        return out.sum() + lse.sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    a = qk.clone().requires_grad_()
    b = qk.clone().requires_grad_()
    got = compiled(a, v, rot)
    got.backward()
    want = fn(b, v, rot)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(a.grad, b.grad)


@needs_ext
def test_opcheck_cpu_ops():
    case = LSHCase(L=20, chunk_size=8, padding=True)
    qk, v, rot, mask, dout, _ = make_lsh_inputs(case, torch.float32, seed=_seed("opcheck"))
    Lp = padded_length(20, 8)
    torch.library.opcheck(torch.ops.longkernels.lsh_hash_sort.default, (qk, rot, mask, 4, Lp))
    _, perm = torch.ops.longkernels.lsh_hash_sort(qk, rot, mask, 4, Lp)
    args = (qk, v, perm, mask, 8, 1, 0, True, 1.0)
    torch.library.opcheck(torch.ops.longkernels.lsh_attention_fwd.default, args)
    out, lm, ll = torch.ops.longkernels.lsh_attention_fwd(*args)
    for dlse in (None, torch.randn_like(lm)):
        torch.library.opcheck(torch.ops.longkernels.lsh_attention_bwd.default,
                              (dout, qk, v, perm, mask, lm, ll, out, dlse, 8, 1, 0, True, 1.0))


def test_normalize_keys_backward_matches_autograd():
    qk = torch.randn(2, 3, 7, 12, dtype=torch.float64, requires_grad=True)
    dk = torch.randn(2, 3, 7, 12, dtype=torch.float64)
    (want,) = torch.autograd.grad((normalize_keys(qk) * dk).sum(), qk)
    assert rel_err(lsh_ops.normalize_keys_backward(qk.detach(), dk), want) < 1e-12


# --------------------------------------------------------------------------------------------
# Dispatch and bad inputs
# --------------------------------------------------------------------------------------------
@needs_ext
def test_backend_choice(monkeypatch):
    qk = torch.randn(1, 1, 4, 8)
    monkeypatch.delenv("LONGKERNELS_BACKEND", raising=False)
    assert lsh_ops.choose_backend(qk, qk, None) == "cpu"
    monkeypatch.setenv("LONGKERNELS_BACKEND", "reference")
    assert lsh_ops.choose_backend(qk, qk, None) == "reference"
    assert lsh_ops.choose_backend(qk, qk, "cpu") == "cpu"
    with pytest.raises(ValueError, match="backend must be one of"):
        lsh_ops.choose_backend(qk, qk, "tpu")


def _good():
    return dict(qk=torch.randn(2, 2, 10, 8), v=torch.randn(2, 2, 10, 8), n_hashes=2, chunk_size=4)


@pytest.mark.parametrize("change, error, match", [
    (dict(n_buckets=3), ValueError, "n_buckets must be even"),
    (dict(n_buckets=0), ValueError, "n_buckets must be >= 2"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (dict(chunk_size=2.0), TypeError, "chunk_size must be an int"),
    (dict(n_hashes=0), ValueError, "n_hashes must be >= 1"),
    (dict(n_chunks_before=-1), ValueError, "n_chunks_before must be >= 0"),
    (dict(rotations=torch.randn(2, 8, 2, 3), n_buckets=4), ValueError, "rotations must be"),
    (dict(rotations=torch.randn(2, 8, 3, 2)), ValueError, "rotations must be"),
    (dict(rotations=torch.ones(2, 8, 2, 2, dtype=torch.long)), TypeError, "rotations must be a floating"),
    (dict(key_padding_mask=torch.zeros(2, 9, dtype=torch.bool)), ValueError, "key_padding_mask must be"),
    (dict(key_padding_mask=torch.zeros(2, 10)), TypeError, "key_padding_mask must be a bool"),
    (dict(v=torch.randn(2, 2, 9, 8)), ValueError, "v must be"),
    (dict(v=torch.randn(2, 2, 10, 8, dtype=torch.float64)), TypeError, "v must have the dtype of qk"),
    (dict(qk=torch.randn(2, 10, 8)), ValueError, "qk must have 4 dimensions"),
    (dict(qk=torch.ones(2, 2, 10, 8, dtype=torch.long)), TypeError, "qk must be float16"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(scale=float("nan")), TypeError, "scale must be a finite"),
    (dict(backend="nope"), ValueError, "backend must be one of"),
])
def test_bad_inputs_raise_before_any_kernel(change, error, match, monkeypatch):
    called = []
    monkeypatch.setattr(lsh_ops.LSHAttentionFunction, "apply", lambda *a: called.append(a))
    args = {**_good(), **change}
    with pytest.raises(error, match=match):
        longkernels.lsh_attention(**args)
    assert not called


@needs_ext
def test_lse_is_float32_for_low_precision():
    case = LSHCase(L=16, chunk_size=8)
    qk, v, rot, _, _, _ = make_lsh_inputs(case, torch.bfloat16, seed=_seed("lse dtype"))
    out, lse = longkernels.lsh_attention(qk, v, n_hashes=2, chunk_size=8, rotations=rot, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


@needs_ext
def test_gradients_flow_through_lse_only():
    """A loss on the LSE alone: gradients through the round weights and the logits, none through v."""
    case = LSHCase(L=24, chunk_size=8, causal=True)
    inputs = make_lsh_inputs(case, torch.float64, seed=_seed("lse only"))
    qk, v, rot, mask, dout, dlse = inputs
    zero = (qk, v, rot, mask, torch.zeros_like(dout), dlse)
    got = run_lsh(case, zero, backend="cpu")
    want = run_lsh(case, zero, backend="reference")
    assert rel_err(got["dqk"], want["dqk"]) < 1e-10
    assert got["dv"].abs().max() == 0


@needs_ext
def test_cpu_hash_breaks_ties_like_argmax():
    """Small integers make exact ties common: the first index of [xR ; -xR] must win, as
    torch.argmax's does (zero rows tie everywhere: bucket 0)."""
    g = torch.Generator().manual_seed(_seed("ties"))
    qk = torch.randint(-2, 3, (2, 3, 50, 8), generator=g).float()
    qk[0, 0, :5] = 0
    rot = torch.randint(-1, 2, (3, 8, 2, 4), generator=g).float()
    buckets, _ = lsh_ops.hash_sort(qk, rot, None, 8, 56)
    want = lsh_hash(torch.nn.functional.pad(qk, (0, 0, 0, 6)), rot, padding_mask(2, 50, 56, None, "cpu"))
    assert torch.equal(buckets.long(), want)
    assert (buckets[0, 0, :, :5] == 0).all()


@needs_ext
def test_cpu_backward_heads_do_not_share_state():
    """The C++ backward reuses one set of sorted-order accumulators for every head, each head
    starting from zero (slots are cleared as they are read): a NaN in one head's input must leave
    the other heads' gradients exactly those of the head computed alone. L is not a multiple of the
    chunk (padding slots), two batches."""
    g = torch.Generator().manual_seed(_seed("heads apart"))
    B, H, L, D, C = 2, 3, 45, 16, 8
    qk = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    dout = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    rot = torch.randn(H, D, 2, 4, generator=g, dtype=torch.float64)
    qk[0, 0, 7, 3] = float("nan")  # batch 0, head 0
    kw = dict(n_hashes=2, chunk_size=C, causal=True)

    def grads(heads):
        q, k = qk[:, heads].clone().requires_grad_(), v[:, heads].clone().requires_grad_()
        longkernels.lsh_attention(q, k, rotations=rot[heads], backend="cpu", **kw).backward(dout[:, heads])
        return q.grad, k.grad

    dqk, dv = grads(slice(0, H))
    assert torch.isnan(dqk[0, 0]).any()  # the poisoned head
    for h in range(1, H):
        alone_dqk, alone_dv = grads(slice(h, h + 1))
        assert torch.equal(dqk[:, h : h + 1], alone_dqk) and torch.equal(dv[:, h : h + 1], alone_dv), h
