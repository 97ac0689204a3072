"""Parity of every memory-attention backend with the reference (docs/semantics.md §1).

Tolerances: longkernels/testing.py. Every case draws fresh random inputs; the loss is
<out, dout> + <lse, dlse>, so the LSE's gradient path is checked along with dq, dk, dv, dmem_k, dmem_v.
"""
import os

import pytest
import torch

import longkernels
from longkernels import _ext
import longkernels.ops.memory_attention as ops_ma
from longkernels.ops.memory_attention import choose_backend, not_supported_reasons
from longkernels.testing import Case, case_seed, compare, make_inputs, run

HAS_CUDA = torch.cuda.is_available()

# Awkward shapes: length 1, empty memory, lengths that are multiples of no block, head dims that
# are not powers of two, Dv != D, GQA, windows, ALiBi, non-contiguous inputs, non-causal.
CASES = [
    Case(N=1, M=0),
    Case(N=1, M=5, D=16),
    Case(N=7, M=0, mem=False),
    Case(N=33, M=17, D=64),
    Case(N=70, M=45, D=80, Dv=48),
    Case(N=37, M=53, D=128, Dv=64, H=4, Hkv=1),
    Case(N=40, M=29, D=16, H=6, Hkv=2, window=9),
    Case(N=31, M=0, D=16, window=1),
    Case(N=50, M=20, D=32, window=100),
    Case(N=45, M=21, D=64, alibi=True, H=4, Hkv=2),
    Case(N=38, M=19, D=16, causal=False),
    Case(N=26, M=30, D=32, causal=False, window=5, alibi=True),
    Case(B=2, N=35, M=18, D=16, strided=True, H=4, Hkv=2),
    Case(N=29, M=40, D=15, Dv=9, H=2, Hkv=1, window=21),
]
# Larger cases only the CPU kernel runs here (its tiles are 256 x 512: these cross tile edges,
# both in memory and in the current segment, and exercise skipped and cut tiles).
BIG_CASES = [
    Case(N=600, M=700, D=64, H=2, Hkv=1),
    Case(N=530, M=0, D=80, Dv=40, window=300, alibi=True),
    Case(B=2, N=300, M=1100, D=16, H=3, Hkv=3, causal=False, strided=True),
    Case(N=777, M=260, D=32, window=513),
]

# Few queries per key/value head: the CPU kernels' decode path (the GQA group's rows together, keys split
# across threads and merged by LSE; float64 through plain loops, float32/bf16/fp16 through the micro-kernels).
# N in {1, 2, 3, 16, 17}, caches up to 5000, GQA groups 1 to 8, windows shorter and longer than the cache.
DECODE_CASES = [
    Case(N=1, M=5000, D=64, H=8, Hkv=8),
    Case(N=1, M=3000, D=128, H=8, Hkv=1),
    Case(N=2, M=1500, D=80, Dv=48, H=4, Hkv=2, alibi=True),
    Case(N=3, M=2000, D=32, H=6, Hkv=3, window=700),
    Case(N=16, M=4000, D=64, H=4, Hkv=1, window=5000),
    Case(N=17, M=900, D=15, Dv=9, H=8, Hkv=2, strided=True),
    Case(B=2, N=16, M=1100, D=64, H=8, Hkv=8, window=40),
    Case(N=5, M=600, D=16, H=4, Hkv=4, causal=False, window=100),
    Case(N=2, M=0, D=64, H=8, Hkv=1),
    # three rows (dot products on the keys in place) with a head dim that is a multiple of neither vector width
    Case(N=1, M=1300, D=20, Dv=12, H=6, Hkv=2),
    # one row over bfloat16 values read in place: a 64-column panel, an 8-column one and a tail of five
    Case(N=1, M=1000, D=24, Dv=77, H=2, Hkv=2),
    # five to eight rows: dot products four rows at a time and P V in two tiles (AVX2)
    Case(N=1, M=2500, D=40, Dv=24, H=7, Hkv=1, alibi=True),
    Case(N=2, M=900, D=128, H=8, Hkv=2, window=500),
]


def _check(case, backend, dtype, device="cpu"):
    seed = case_seed(case, str(dtype), backend, os.environ.get("LONGKERNELS_CPU_TILES"))
    rows = compare(case, backend, dtype, device=device, seed=seed)
    bad = [f"{name}: err {err:.2e} > {allowed:.2e}" for name, err, allowed, ok in rows if not ok]
    assert not bad, f"{backend} {dtype} {case.describe()} (seed {seed}): " + "; ".join(bad)


def test_extension_is_built():
    # The C++ path is this machine's fast path: a missing extension is a failure, not a skip.
    assert _ext.available(), _ext.LOAD_ERROR


@pytest.mark.parametrize("case", CASES + BIG_CASES, ids=Case.describe)
def test_cpu_float64(case):
    _check(case, "cpu", torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [CASES[4], CASES[5], CASES[9], CASES[12], CASES[13], BIG_CASES[0], BIG_CASES[1]],
                         ids=Case.describe)
def test_cpu_low_precision(case, dtype):
    _check(case, "cpu", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[5], CASES[9], CASES[13], BIG_CASES[1]], ids=Case.describe)
def test_cpu_blas_tiles(case, dtype, monkeypatch):
    # With AVX-512 or AVX2 float32 forwards use our packed micro-kernels (bfloat16 with AVX-512
    # BF16); the BLAS path (what other CPUs get) must stay right too.
    monkeypatch.setenv("LONGKERNELS_CPU_TILES", "blas")
    _check(case, "cpu", dtype)


@pytest.mark.skipif(_ext.available() and not _ext.build_info().get("cpu_avx2_fma"),
                    reason="this CPU has no AVX2 + FMA: the AVX2 tile products cannot run here")
@pytest.mark.parametrize("case", [CASES[5], CASES[9], CASES[13], BIG_CASES[1]], ids=Case.describe)
def test_cpu_avx2_tiles(case, monkeypatch):
    # The AVX2 float32 micro-kernels (CPUs without AVX-512), also on a machine that has AVX-512.
    monkeypatch.setenv("LONGKERNELS_CPU_TILES", "avx2")
    _check(case, "cpu", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=Case.describe)
def test_cpu_decode(case, dtype):
    _check(case, "cpu", dtype)


@pytest.mark.parametrize("tiles", ["blas", "avx2"])
@pytest.mark.parametrize("case", [DECODE_CASES[i] for i in (0, 1, 2, 5, 6, 9, 10, 11, 12)], ids=Case.describe)
def test_cpu_decode_twins(case, tiles, monkeypatch):
    # The portable BLAS tiles (LONGKERNELS_CPU_TILES=blas bypasses the decode path) and the AVX2 kernels, on
    # the decode shapes, where an AVX-512 machine would take its own kernels.
    if tiles == "avx2" and _ext.available() and not _ext.build_info().get("cpu_avx2_fma"):
        pytest.skip("this CPU has no AVX2 + FMA")
    monkeypatch.setenv("LONGKERNELS_CPU_TILES", tiles)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        _check(case, "cpu", dtype)


@pytest.mark.parametrize("case", CASES, ids=Case.describe)
def test_triton_interpreter_float64(case):
    _check(case, "triton", torch.float64)


# The Triton decode kernels (split keys, combined by LSE): few queries per kv head, caches long enough
# for several splits under the interpreter.
TRITON_DECODE_CASES = [
    Case(N=1, M=100, D=16, H=4, Hkv=2),
    Case(N=3, M=90, D=20, Dv=12, H=4, Hkv=1, window=30, alibi=True),
    Case(N=16, M=40, D=16, H=2, Hkv=2, causal=False),
    Case(N=2, M=0, D=16, H=8, Hkv=1),
    Case(B=2, N=5, M=70, D=32, H=6, Hkv=3, strided=True, window=200),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TRITON_DECODE_CASES, ids=Case.describe)
def test_triton_interpreter_decode(case, dtype):
    _check(case, "triton", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[4], CASES[9], CASES[12]], ids=Case.describe)
def test_triton_interpreter_low_precision(case, dtype):
    _check(case, "triton", dtype)


def _gpu_tiles():
    """Every (BLOCK_M, BLOCK_N) of the GPU's config lists (autotuned, or the first that fits), any kernel."""
    try:
        from longkernels.triton_kernels import memory_attention as tma
    except ImportError:  # no triton: the test below skips
        return [(16, 16)]
    pairs = set()
    for configs, _max_tile in tma._CONFIG_LISTS.values():
        pairs |= {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in configs}
    return sorted(pairs)


# Lengths that are multiples of no GPU tile and span more than one of the largest (128), with memory, a window, GQA,
# padding, documents, softcap and sinks between them.
GPU_TILE_CASES = [
    Case(N=203, M=90, D=8, H=2, Hkv=1, window=150, alibi=True),
    Case(B=2, N=181, M=0, D=8, H=2, Hkv=2, padding="left", docs=3, softcap=5.0, sinks=True),
]


needs_interpreter = pytest.mark.skipif(
    bool(not_supported_reasons("triton", torch.empty(1, 1, 1, 16), torch.empty(1, 1, 1, 16))),
    reason="Triton does not run here (needs triton, and TRITON_INTERPRET=1 on CPU)")


@needs_interpreter
@pytest.mark.parametrize("index, blocks", list(enumerate(_gpu_tiles())), ids=lambda x: str(x))
def test_triton_interpreter_gpu_tiles(index, blocks, monkeypatch):
    # The interpreter runs 16 x 16 tiles; a GPU runs the configs' (up to 128 x 128, query and key tiles of
    # different sizes). Every tile shape of the lists, in all three kernels at once, in float64: the tile
    # ranges, the causal diagonal, window edges and masks at the sizes a GPU will use (the two cases taken in
    # turn, so that each meets about half the shapes, small and large).
    from longkernels.triton_kernels import memory_attention as tma
    monkeypatch.setattr(tma, "INTERPRETER_BLOCKS", {name: blocks for name in ("fwd", "dq", "dkdv")})
    _check(GPU_TILE_CASES[index % len(GPU_TILE_CASES)], "triton", torch.float64)


@needs_interpreter
@pytest.mark.parametrize("split", [130, 1000], ids=lambda s: f"split{s}")
def test_triton_interpreter_decode_gpu_tiles(split, monkeypatch):
    # The decode kernel's GPU step of 64 keys, with splits of a length that is no multiple of it (a GPU sizes
    # them from its multiprocessor count) and with one split holding every key.
    from longkernels.triton_kernels import memory_attention as tma
    monkeypatch.setattr(tma, "INTERPRETER_DECODE_BLOCK_N", tma.GPU_DECODE_BLOCK_N)
    monkeypatch.setattr(tma, "INTERPRETER_SPLIT", split)
    for case in TRITON_DECODE_CASES + [Case(N=2, M=300, D=8, H=8, Hkv=2, window=200, padding="random", sinks=True)]:
        _check(case, "triton", torch.float64)


@pytest.mark.parametrize("case", [CASES[4], CASES[12], TRITON_DECODE_CASES[1]], ids=Case.describe)
def test_triton_interpreter_float32_under_tf32_setting(case, monkeypatch):
    # torch.backends.cuda.matmul.fp32_precision = "tf32" makes the float32 launches take TF32 products
    # (triton_kernels.tuning.dot_precision); the interpreter multiplies in float32 whatever the setting, so here
    # the kernels run that launch path and meet the float32 rule. GPU twin: test_gpu_float32_tf32.
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32")
    _check(case, "triton", torch.float32)


def test_cpu_gradcheck():
    case = Case(N=9, M=6, D=8, Dv=5, H=2, Hkv=1, window=4, alibi=True)
    q, k, v, mk, mv, slopes, _, _, _ = make_inputs(case, torch.float64)
    slopes = slopes.double()
    leaves = [t.clone().requires_grad_() for t in (q, k, v, mk, mv)]

    def f(q, k, v, mk, mv):
        out, lse = longkernels.memory_attention(q, k, v, mk, mv, window=case.window, alibi_slopes=slopes,
                                                return_lse=True, backend="cpu")
        return out, lse

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-8)


def test_forward_only_under_no_grad_matches():
    case = CASES[4]
    inputs = make_inputs(case, torch.float32)
    with torch.no_grad():
        got = run(case, inputs, backend="cpu", with_grad=False)
    ref = run(case, inputs, backend="reference", dtype=torch.float64, with_grad=False)
    assert torch.allclose(got["out"].double(), ref["out"], atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph_cpu():
    case = Case(N=40, M=24, D=16, H=4, Hkv=2, window=17)
    q, k, v, mk, mv, _, dout, _, _ = make_inputs(case, torch.float32)

    def f(q, k, v, mk, mv):
        return longkernels.memory_attention(q, k, v, mk, mv, window=case.window, backend="cpu")

    compiled = torch.compile(f, fullgraph=True)
    eager_leaves = [t.clone().requires_grad_() for t in (q, k, v, mk, mv)]
    comp_leaves = [t.clone().requires_grad_() for t in (q, k, v, mk, mv)]
    out_e = f(*eager_leaves)
    out_c = compiled(*comp_leaves)
    torch.testing.assert_close(out_c, out_e)
    (out_e * dout).sum().backward()
    (out_c * dout).sum().backward()
    for a, b in zip(comp_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    case = Case(N=20, M=11, D=16, H=4, Hkv=2, window=7, alibi=True)
    q, k, v, mk, mv, slopes, dout, _, _ = make_inputs(case, torch.float32)
    suffix = "_triton" if backend == "triton" else ""
    fwd = getattr(torch.ops.longkernels, "memory_attention_fwd" + suffix)
    bwd = getattr(torch.ops.longkernels, "memory_attention_bwd" + suffix)
    scale = 16 ** -0.5
    out, lse = fwd(q, k, v, mk, mv, slopes, True, 7, scale)
    delta = (out * dout).sum(-1)
    torch.library.opcheck(fwd, (q, k, v, mk, mv, slopes, True, 7, scale))
    torch.library.opcheck(bwd, (dout, q, k, v, mk, mv, slopes, lse, delta, True, 7, scale))
    # With every mask and score term (padding, documents, softcap, sinks).
    pad = torch.zeros(1, 31, dtype=torch.bool)
    pad[0, :3] = True
    ids = torch.tensor([[0] * 15 + [1] * 16])
    sinks = torch.randn(4)
    extra = (pad, ids, 5.0)
    out, lse = fwd(q, k, v, mk, mv, slopes, True, 7, scale, *extra, sinks)
    torch.library.opcheck(fwd, (q, k, v, mk, mv, slopes, True, 7, scale, *extra, sinks))
    torch.library.opcheck(bwd, (dout, q, k, v, mk, mv, slopes, lse, delta, True, 7, scale, *extra))


def test_no_memory_gives_no_memory_grads():
    case = Case(N=12, M=0, mem=False)
    q, k, v, *_ = make_inputs(case, torch.float64)
    q.requires_grad_()
    out = longkernels.memory_attention(q, k, v, backend="cpu")
    out.sum().backward()
    assert q.grad is not None and k.grad is None


def test_causal_is_bottom_right_aligned():
    # With M memory keys, the last query sees all M + N keys and the first sees M + 1 of them:
    # the first query's output must not depend on any current key after itself.
    case = Case(N=6, M=4, D=8)
    q, k, v, mk, mv, *_ = make_inputs(case, torch.float64)
    base = longkernels.memory_attention(q, k, v, mk, mv, backend="cpu")
    k2 = k.clone()
    k2[:, :, 1:] += 1.0
    moved = longkernels.memory_attention(q, k2, v, mk, mv, backend="cpu")
    torch.testing.assert_close(moved[:, :, 0], base[:, :, 0], rtol=0, atol=0)
    assert not torch.allclose(moved[:, :, -1], base[:, :, -1])


# ----------------------------------------------------------------------------------------------
# Bad inputs: a clear ValueError/TypeError naming the argument, before any kernel runs.
# ----------------------------------------------------------------------------------------------
def _good(**over):
    args = dict(q=torch.randn(1, 4, 5, 8), k=torch.randn(1, 2, 5, 8), v=torch.randn(1, 2, 5, 8),
                mem_k=torch.randn(1, 2, 3, 8), mem_v=torch.randn(1, 2, 3, 8))
    args.update(over)
    return args


BAD = [
    (dict(q=torch.randn(4, 5, 8)), ValueError, "q must have 4 dimensions"),
    (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    (dict(k=torch.randn(1, 2, 5, 8, dtype=torch.float64)), TypeError, "k must have the dtype of q"),
    (dict(q=torch.randint(0, 3, (1, 4, 5, 8))), TypeError, "q must be float16"),
    (dict(k=torch.randn(1, 3, 5, 8), v=torch.randn(1, 3, 5, 8)), ValueError, "multiple of k's heads"),
    (dict(k=torch.randn(1, 2, 6, 8)), ValueError, "k must have shape"),
    (dict(k=torch.randn(1, 2, 5, 7)), ValueError, "k must have shape"),
    (dict(v=torch.randn(1, 2, 4, 8)), ValueError, "v must have shape"),
    (dict(mem_v=None), ValueError, "mem_k and mem_v must be given together"),
    (dict(mem_k=torch.randn(1, 2, 3, 7)), ValueError, "mem_k must have shape"),
    (dict(mem_v=torch.randn(1, 2, 4, 8)), ValueError, "mem_v must have shape"),
    (dict(mem_k=torch.randn(1, 2, 3, 8).half(), mem_v=torch.randn(1, 2, 3, 8).half()), TypeError,
     "mem_k must have the dtype of q"),
    (dict(q=torch.randn(1, 4, 0, 8), k=torch.randn(1, 2, 0, 8), v=torch.randn(1, 2, 0, 8)), ValueError,
     "at least one query"),
    (dict(window=0), ValueError, "window must be >= 1"),
    (dict(window=-3), ValueError, "window must be >= 1"),
    (dict(window=2.5), TypeError, "window must be an int"),
    (dict(window=True), TypeError, "window must be an int"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(scale=float("nan")), TypeError, "scale must be a finite number"),
    (dict(scale="0.1"), TypeError, "scale must be a finite number"),
    (dict(alibi_slopes=torch.rand(3)), ValueError, "alibi_slopes must have shape"),
    (dict(alibi_slopes=[0.5] * 4), TypeError, "alibi_slopes must be a torch.Tensor"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.long)), TypeError, "alibi_slopes must be floating"),
    (dict(alibi_slopes=torch.rand(4, requires_grad=True)), ValueError, "alibi_slopes receive no gradient"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("over,exc,msg", BAD, ids=[b[2] for b in BAD])
def test_bad_input(over, exc, msg, monkeypatch):
    # Make sure no kernel runs: any op call would raise a different error.
    def boom(*a, **k):
        raise AssertionError("a kernel ran before validation")

    monkeypatch.setattr(ops_ma.MemoryAttentionFunction, "apply", boom)
    monkeypatch.setattr(ops_ma, "_reference", boom)
    args = _good(**over)
    with pytest.raises(exc, match=msg):
        longkernels.memory_attention(**args)


# ----------------------------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------------------------
def test_default_backend_on_cpu_is_the_extension():
    q = torch.randn(1, 1, 2, 8)
    assert choose_backend(q, q, None) == "cpu"


def test_env_var_overrides_backend(monkeypatch):
    q = torch.randn(1, 1, 2, 8)
    monkeypatch.setenv("LONGKERNELS_BACKEND", "reference")
    assert choose_backend(q, q, None) == "reference"
    assert choose_backend(q, q, "cpu") == "cpu"  # the argument wins over the environment


def test_backend_explains_itself(monkeypatch):
    q = torch.randn(1, 1, 2, 8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = not_supported_reasons("triton", q, q)
    assert any("TRITON_INTERPRET=1" in r for r in reasons)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        choose_backend(q, q, "triton")
    assert not_supported_reasons("cuda", q, q)  # no CUDA tensors here
    big = torch.randn(1, 1, 2, 300)
    assert any("head dim" in r for r in not_supported_reasons("triton", big, big))


# ----------------------------------------------------------------------------------------------
# GPU: the same parity on CUDA tensors. The CPU twins above (C++ kernel, Triton interpreter) run
# the same cases everywhere; these run only where a GPU is present.
# ----------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none on this machine); CPU twins: "
                                              "test_cpu_* and test_triton_interpreter_*")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES + BIG_CASES, ids=Case.describe)
def test_gpu(case, dtype, backend):
    # One test per case: a GPU run shards the tests over processes (LONGKERNELS_TEST_SHARD), and each new
    # shape compiles its own kernels.
    probe = torch.empty(1, 1, 1, 16, device="cuda")
    reasons = not_supported_reasons(backend, probe, probe)
    assert not reasons, f"{backend} cannot run on this GPU machine: {reasons}"
    _check(case, backend, dtype, device="cuda")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", [CASES[4], CASES[12], BIG_CASES[1], TRITON_DECODE_CASES[1]], ids=Case.describe)
def test_gpu_float32_tf32(case, monkeypatch):
    # With TF32 allowed for float32 products the kernels multiply in TF32, and so do the reference's matrix
    # products on the GPU: the low-precision reference the rule scales by has TF32's error too.
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32")
    _check(case, "triton", torch.float32, device="cuda")
