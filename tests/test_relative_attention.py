"""Transformer-XL relative positions fused in memory attention (docs/semantics.md §9): the C++ CPU kernels and
the Triton kernels (under TRITON_INTERPRET=1 here) against the reference, output, LSE and the gradients of q, k, v,
the memory, pos_emb and both biases."""
from __future__ import annotations

import functools

import pytest
import torch

import longkernels
from longkernels import _ext
from longkernels.ops import dispatch
from longkernels.ops.memory_attention import relative_order, relative_reasons
from longkernels.reference.memory_attention import memory_attention as reference
from longkernels.testing import FLOAT64_RTOL, case_seed, failures, rel_err

needs_ext = pytest.mark.skipif(not _ext.available(), reason="the C++ extension is not built (a failure in "
                               "tests/test_memory_attention.py::test_extension_is_built)")
needs_triton = pytest.mark.skipif(bool(dispatch.triton_reasons("cpu")),
                                  reason="; ".join(dispatch.triton_reasons("cpu")) or "triton runs")

# (B, H, Hkv, N, M, D, window, extra P rows, strided)
CASES = [
    (1, 2, 2, 1, 0, 16, None, 0, False),       # one query, no memory
    (1, 2, 2, 1, 700, 32, None, 3, False),      # one query over a long memory
    (2, 4, 2, 37, 21, 24, None, 0, False),      # GQA, lengths that are multiples of no tile
    (1, 2, 1, 300, 600, 16, 250, 5, True),      # window shorter than the memory, strided inputs
    (1, 3, 3, 530, 0, 12, 40, 0, False),        # D not a power of 2, no memory, short window
    (1, 2, 2, 257, 513, 64, 2000, 0, False),    # a window that hides nothing
    # The decode path (few rows per kv head over a long cache, split across threads):
    (1, 6, 2, 3, 1300, 20, None, 2, True),      # GQA group of 3, three queries, D = 20, strided (pos_emb too)
    (1, 4, 4, 16, 900, 32, 300, 0, False),      # 16 queries, a window inside the memory
    (2, 4, 1, 1, 200, 16, 64, 7, False),        # MQA, one query, a window, P longer than needed
]
DECODE = CASES[6:]


def _ids(c):
    return "B{}-H{}/{}-N{}-M{}-D{}-w{}-P+{}{}".format(*c[:8], "-strided" if c[8] else "")


def _inputs(c, dtype, seed):
    B, H, Hkv, N, M, D, window, extra, strided = c
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    def act(b, h, n, d):
        return rnd(b, n, h, d).transpose(1, 2) if strided else rnd(b, h, n, d)

    L = M + N
    P = (min(window, L) if window else L) + extra
    pos_emb = rnd(P, H, D).transpose(0, 1) if strided else rnd(H, P, D)  # strided as the modules' projection gives it
    t = dict(q=act(B, H, N, D), k=act(B, Hkv, N, D), v=act(B, Hkv, N, D), pos_emb=pos_emb * 0.5,
             content_bias=rnd(H, D) * 0.3, pos_bias=rnd(H, D) * 0.3)
    if M:
        t.update(mem_k=act(B, Hkv, M, D), mem_v=act(B, Hkv, M, D))
    return t, window, g


def _run(fn, t, window, dout, cdt, device="cpu"):
    leaves = {n: x.detach().to(device=device, dtype=cdt).requires_grad_() for n, x in t.items()}
    out, lse = fn(**leaves, window=window, return_lse=True)
    loss = (out.double().cpu() * dout).sum() + lse.double().cpu().sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"out": out.detach().cpu(), "lse": lse.detach().cpu(), **{"d" + n: g.cpu() for n, g in zip(leaves, grads)}}


def _check(c, dtype, backend="cpu", device="cpu"):
    seed = case_seed(c, str(dtype))
    t, window, g = _inputs(c, dtype, seed)
    B, H, N = c[0], c[1], c[3]
    dout = torch.randn(B, H, N, c[5], generator=g, dtype=torch.float64)
    got = _run(functools.partial(longkernels.memory_attention, backend=backend), t, window, dout, dtype, device)
    truth = _run(reference, t, window, dout, torch.float64)
    lowp = None if dtype == torch.float64 else _run(reference, t, window, dout, dtype)
    bad = failures(truth, got, lowp, dtype)
    assert not bad, f"{backend} {dtype} {_ids(c)} (seed {seed}): " + "; ".join(bad)


@needs_ext
@pytest.mark.parametrize("c", CASES, ids=_ids)
def test_float64(c):
    _check(c, torch.float64)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("c", [CASES[2], CASES[3], CASES[5], *DECODE], ids=_ids)
def test_low_precision(c, dtype):
    _check(c, dtype)


# The interpreter runs every tile in Python: the cases above, shortened where they are long (the tile logic
# is the same at any length; the 16-row tiles under the interpreter make these several tiles long).
TRITON_CASES = CASES[:3] + [
    (1, 2, 1, 70, 90, 16, 45, 5, True),         # window shorter than the memory, strided inputs
    (1, 3, 3, 53, 0, 12, 9, 0, False),          # D not a power of 2, no memory, short window
    (1, 2, 2, 33, 40, 40, 500, 0, False),       # a window that hides nothing, D not a power of 2
    (2, 8, 2, 20, 17, 16, None, 1, False),      # GQA group of 4
]


@needs_triton
@pytest.mark.parametrize("c", TRITON_CASES, ids=_ids)
def test_triton_float64(c):
    _check(c, torch.float64, "triton")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("c", [TRITON_CASES[2], TRITON_CASES[3]], ids=_ids)
def test_triton_low_precision(c, dtype):
    _check(c, dtype, "triton")


def _gpu_tiles():
    """Every (BLOCK_M, BLOCK_N) of relative attention's GPU config lists."""
    try:
        from longkernels.triton_kernels import relative_attention as tr
    except ImportError:  # no triton: the test skips
        return []
    return sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for cs in tr._CONFIG_LISTS.values() for c in cs})


@needs_triton
@pytest.mark.parametrize("blocks", sorted({(16, 32), (32, 16), *_gpu_tiles()}), ids=str)
def test_triton_unequal_tiles(blocks, monkeypatch):
    # The band's column of a pair, a + BLOCK_N - 1 - b, and its width 2 max(BLOCK_M, BLOCK_N) hold for query and
    # key tiles of different sizes; and every tile shape of the GPU's config lists runs right (under the
    # interpreter, whose own tiles are 16 x 16).
    from longkernels.triton_kernels import relative_attention as tr
    monkeypatch.setattr(tr, "INTERPRETER_BLOCKS", {name: blocks for name in ("fwd", "dq", "dkdv")})
    _check(TRITON_CASES[3], torch.float64, "triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine); "
                    "test_triton_float64/test_triton_low_precision are its twins under the interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("c", CASES, ids=_ids)
def test_gpu(c, dtype):
    # Compiled Triton on CUDA tensors, at every case of the CPU matrix (one test per case: make gpu-check runs
    # them in parallel).
    _check(c, dtype, "triton", device="cuda")


def test_backend_order():
    # CUDA tensors go to Triton (the compiled CUDA kernels take no relative positions, and say so); CPU tensors
    # to the C++ kernels.
    q = torch.zeros(1, 2, 4, 16)
    assert relative_order("cuda") == ("triton", "reference")
    assert relative_order("cpu") == ("cpu", "reference")
    assert any("not in cuda" in r for r in relative_reasons("cuda", q, q))
    assert relative_reasons("triton", q, q) == dispatch.triton_reasons("cpu", head_dim=16, max_head_dim=256,
                                                                          dtype=q.dtype)


@needs_ext
def test_no_position_matrix_is_saved():
    # The autograd graph keeps the inputs, the output and the LSE: nothing of size N x (M + N).
    from longkernels.testing import saved_tensor_bytes
    H, N, M, D = 2, 512, 512, 16
    q, k, v = (torch.randn(1, H, N, D, requires_grad=True) for _ in range(3))
    mk, mv = (torch.randn(1, H, M, D, requires_grad=True) for _ in range(2))
    R = torch.randn(H, M + N, D, requires_grad=True)
    saved = saved_tensor_bytes(longkernels.memory_attention, q, k, v, mk, mv, pos_emb=R)
    inputs = sum(t.numel() * 4 for t in (q, k, v, mk, mv, R)) + 2 * q.numel() * 4  # q + biases (2 copies)
    assert saved <= inputs + q.numel() * 4 + H * N * 4 + 1024  # ... plus out and lse
    assert saved < H * N * (M + N) * 4  # one position-score matrix would be more than all of it


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(pos_emb=torch.randn(2, 10, 8)), ValueError, "P >= 12"),                 # too few distances
    (dict(pos_emb=torch.randn(3, 20, 8)), ValueError, r"pos_emb must have shape \(H=2"),
    (dict(pos_emb=torch.randn(2, 20, 8), causal=False), ValueError, "causal=True"),
    (dict(pos_emb=torch.randn(2, 20, 8), content_bias=torch.randn(2, 7)), ValueError, "content_bias must have"),
    (dict(pos_bias=torch.randn(2, 8)), ValueError, "need pos_emb"),
    (dict(pos_emb=torch.randn(2, 20, 8), alibi_slopes=torch.ones(2)), ValueError, "two position schemes"),
    (dict(pos_emb=torch.randn(2, 20, 8), softcap=5.0), ValueError, "does not combine"),
    (dict(pos_emb=torch.randn(2, 20, 8).double()), TypeError, "pos_emb must have the dtype of q"),
    (dict(pos_emb=[1, 2]), TypeError, "pos_emb must be a torch.Tensor"),
])
def test_bad_input(kwargs, err, match):
    q = torch.randn(1, 2, 12, 8)
    with pytest.raises(err, match=match):
        longkernels.memory_attention(q, q, q, **kwargs)


@needs_ext
def test_op_checks():
    q = torch.randn(1, 2, 12, 8)
    e = q[:, :, :0]
    op = torch.ops.longkernels.memory_attention_rel_fwd
    with pytest.raises(RuntimeError, match="P >= 12"):
        op(q, q, q, q, e, e, torch.randn(2, 11, 8), True, 0, 1.0)
    with pytest.raises(RuntimeError, match="q_pos must have q's shape"):
        op(q, q[:, :, :5], q, q, e, e, torch.randn(2, 12, 8), True, 0, 1.0)
    with pytest.raises(RuntimeError, match="need causal"):
        op(q, q, q, q, e, e, torch.randn(2, 12, 8), False, 0, 1.0)
    out, _ = op(q, q, q, q, e, e, torch.randn(2, 3, 8), True, 3, 1.0)  # a window of 3: distances 0 .. 2
    assert out.shape == q.shape


# --------------------------------------------------------------------------------------------
# RelativeMemoryAttention against a transcription of Transformer-XL's layer
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("same_length, clamp_len", [(False, None), (True, None), (False, 9)])
def test_layer_matches_transformer_xl(seed, pre_norm, same_length, clamp_len):
    import os
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from _txl_reference import txl_layer
    from longkernels.nn import RelativeMemoryAttention

    torch.manual_seed(seed)
    E, H, Dh, mem_len, seg = 32, 4, 8, 12, 10
    layer = RelativeMemoryAttention(E, H, head_dim=Dh, mem_len=mem_len, clamp_len=clamp_len,
                                    same_length=same_length, pre_norm=pre_norm, dtype=torch.float64)
    with torch.no_grad():
        layer.layer_norm.weight.uniform_(0.5, 1.5)
        layer.layer_norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4 * seg, E, dtype=torch.float64)
    mems, ref_mems = None, None
    for s in range(4):  # several segments: the memory fills past mem_len, the window (same_length) bites
        xs = x[:, s * seg:(s + 1) * seg].clone().requires_grad_()
        y, mems = layer(xs, mems)
        xt = xs.detach().transpose(0, 1).clone().requires_grad_()
        want = txl_layer(xt, ref_mems, layer.qkv_net.weight, layer.r_net.weight, layer.o_net.weight,
                         layer.r_w_bias, layer.r_r_bias, layer.layer_norm, H, Dh, pre_lnorm=pre_norm,
                         same_length=same_length, mem_len=mem_len, clamp_len=clamp_len).transpose(0, 1)
        assert rel_err(y, want) <= FLOAT64_RTOL, f"segment {s}"
        g = torch.randn_like(y)
        params = [xs] + list(layer.parameters())
        got = torch.autograd.grad((y * g).sum(), params)
        ref = torch.autograd.grad((want * g).sum(), [xt] + list(layer.parameters()))
        assert rel_err(got[0], ref[0].transpose(0, 1)) <= FLOAT64_RTOL
        for (name, _), a, b in zip(layer.named_parameters(), got[1:], ref[1:]):
            assert rel_err(a, b) <= FLOAT64_RTOL, f"segment {s}: {name}"
        cat = xt.detach() if ref_mems is None else torch.cat([ref_mems, xt.detach()], 0)
        ref_mems = cat[-mem_len:]
        assert torch.equal(mems.h, ref_mems.transpose(0, 1))


def test_memory_attention_relative_mode_segments_equal_whole(seed):
    # MemoryAttention(positions="relative"): fed segment by segment with a memory that holds every earlier
    # token, the outputs and gradients equal the whole sequence's at once (distances continue across segments).
    from longkernels.nn import LongContextLM, MemoryAttention

    torch.manual_seed(seed)
    layer = MemoryAttention(32, 4, num_kv_heads=2, mem_len=48, positions="relative", dtype=torch.float64)
    with torch.no_grad():
        layer.content_bias.normal_()
        layer.pos_bias.normal_()
    x = torch.randn(2, 48, 32, dtype=torch.float64, requires_grad=True)
    whole, _ = layer(x)
    gw = torch.autograd.grad(whole.sum(), [x, layer.r_net.weight, layer.pos_bias])
    mems, parts = None, []
    for s in range(3):
        y, mems = layer(x[:, s * 16:(s + 1) * 16], mems)
        parts.append(y)
    y = torch.cat(parts, dim=1)
    assert rel_err(y, whole) <= FLOAT64_RTOL
    # Transformer-XL's stop-gradient: the memory is detached, so only the last segment's own path differs;
    # the gradients of the last segment's outputs through the position parameters are compared.
    g_last = torch.autograd.grad(parts[-1].sum(), [layer.r_net.weight, layer.pos_bias])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in g_last)
    assert all(torch.isfinite(g).all() for g in gw)
    model = LongContextLM(64, 32, 2, 4, attention="memory", mem_len=16, positions="relative", dtype=torch.float64)
    out = model(torch.randint(0, 64, (2, 16)))
    out = model(torch.randint(0, 64, (2, 16)), out.mems)
    out.logits.sum().backward()
    assert model.layers.blocks[1].attention.pos_bias.grad.abs().sum() > 0


@needs_ext
@pytest.mark.parametrize("tiles", ["blas", "avx2"])
@pytest.mark.parametrize("c", [CASES[2], CASES[3], DECODE[0]], ids=_ids)
def test_cpu_twins(c, tiles, monkeypatch):
    # The forward's content products run on the micro-kernels where the CPU has them: the portable BLAS tiles
    # and the AVX2 kernels must stay right too, on a machine that would take its AVX-512 ones.
    if tiles == "avx2" and not _ext.build_info().get("cpu_avx2_fma"):
        pytest.skip("this CPU has no AVX2 + FMA: the AVX2 tile products cannot run here")
    monkeypatch.setenv("LONGKERNELS_CPU_TILES", tiles)
    for dtype in (torch.float32, torch.bfloat16):
        _check(c, dtype)
