"""Triton kernels of memory-segment causal attention (docs/semantics.md §1).

The math is ``longkernels/reference/memory_attention.py``; the launchers' contract is the docstring of
``longkernels/ops/memory_attention.py``. Keys are two ranges, the memory ``mem_k[0:M]`` (positions
``0 .. M-1``) and the current segment ``k[0:N]`` (positions ``M .. M+N-1``); query ``i`` sits at ``M + i``.
Each range is tiled from its own start, so a key tile never straddles the two tensors.

Three kernels, each a flash-attention pass that never forms the ``N x (M + N)`` matrix:

* ``_fwd_kernel``   one program per (query tile, b, h): online softmax over both key ranges.
* ``_dkdv_kernel``  one program per (key tile, b, kv head): loops the GQA group's query heads, so dk and
                    dv are summed in registers, without atomics.
* ``_dq_kernel``    one program per (query tile, b, h): dq in registers, without atomics.

Everything is deterministic. Per program, only the key (or query) tiles that some row can see are
visited; of those, tiles every row sees in full run without an elementwise mask, and the diagonal,
window-edge and range-tail tiles run with one ("stages", as in Triton's fused-attention tutorial).

Accumulation is float32 (float64 for float64 inputs, which run under the interpreter only). float32
inputs use IEEE dot products, not TF32, so that they match the reference to float32 round-off. Off
float64, exponentials are base 2 with log2(e) folded into the scale and the ALiBi slope; the LSE is
converted back to natural log when stored and to base 2 when read in backward.
"""
from __future__ import annotations

import math
import os
import struct

import torch
import triton
import triton.language as tl

from .tuning import LAUNCH_OPTIONS, autotune_enabled, dot_precision, launch_first_fitting

# Triton decides at decoration time whether kernels are interpreted; the launchers follow it.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Tiles under the interpreter, (BLOCK_M query rows, BLOCK_N key rows) per kernel: small and fixed,
# since autotuning there would run every config in Python. Tests may change them.
INTERPRETER_BLOCKS = {"fwd": (16, 16), "dq": (16, 16), "dkdv": (16, 16)}

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_NEG_INF = tl.constexpr(float("-inf"))
_POS_INF = tl.constexpr(float("inf"))
# The interpreter multiplies bfloat16 operands of tl.dot as their raw uint16 bits (unsupported there,
# triton-lang/triton#11584); under it, and only there, such dots run on float32 copies, which gives
# the GPU's result: bfloat16 products are exact in float32 and the GPU sums them in float32.
_BF16_DOT_IN_F32 = tl.constexpr(_INTERPRET)

# Sequence lengths and head counts vary from call to call: keep them runtime values so one compiled
# kernel serves all of them (Triton would otherwise turn a value of 1 into a constant).
_RUNTIME_INTS = ["H", "HKV", "N", "M", "Q0", "window", "N_BUCKET", "M_BUCKET"]


# --------------------------------------------------------------------------------------------
# Helpers shared by the kernels.
# --------------------------------------------------------------------------------------------
@triton.jit
def _exp(x, EXP2: tl.constexpr):
    if EXP2:
        y = tl.exp2(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _prob(x, EXP2: tl.constexpr):
    """exp(logit - lse) in the backward, at most 1: recomputed from the LSE it can round above 1 where
    logits are huge (the LSE's last bit worth more than 1); the comparison keeps a NaN a NaN."""
    p = _exp(x, EXP2)
    return tl.where(p > 1.0, 1.0, p)


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr):
    if _BF16_DOT_IN_F32:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def _load_rows(ptrs, row_ok, cols, NCOL: tl.constexpr, BCOL: tl.constexpr, MASK_ROWS: tl.constexpr):
    """A (rows, BCOL) tile; columns past the head dim NCOL read as 0 (they add 0 to every dot)."""
    if MASK_ROWS:
        if NCOL == BCOL:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < NCOL), other=0.0)
    else:
        if NCOL == BCOL:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=cols[None, :] < NCOL, other=0.0)
    return x


@triton.jit
def _key_tiles(q_lo, q_hi, rs, L, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Key tiles of the range [rs, rs + L) for the query positions q_lo..q_hi (inclusive, real rows).

    Returns t_lo <= t_f0 <= t_f1 <= t_hi: tiles [t_lo, t_hi) hold every key some row sees; tiles
    [t_f0, t_f1) lie inside the range and are seen in full by every row, so they need no mask.
    """
    # Keys seen by some row: [lo, hi); by every row: [full_lo, full_hi); local to the range.
    if HAS_WINDOW:  # j > q - window
        lo = _clamp(q_lo - window + 1 - rs, 0, L)
        full_lo = _clamp(q_hi - window + 1 - rs, 0, L)
    else:
        lo = 0
        full_lo = 0
    if CAUSAL:  # j <= q
        hi = _clamp(q_hi + 1 - rs, 0, L)
        full_hi = _clamp(q_lo + 1 - rs, 0, L)
    else:
        hi = L
        full_hi = L
    t_lo = lo // BLOCK_N
    t_hi = tl.maximum(tl.cdiv(hi, BLOCK_N), t_lo)
    t_f0 = _clamp(tl.cdiv(full_lo, BLOCK_N), t_lo, t_hi)
    # full_hi <= L, so the range's partial last tile is never unmasked.
    t_f1 = _clamp(full_hi // BLOCK_N, t_f0, t_hi)
    return t_lo, t_f0, t_f1, t_hi


@triton.jit
def _query_tiles(k_lo, k_hi, Q0, N, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """Query tiles for the key positions k_lo..k_hi (inclusive, real keys), query i at Q0 + i; as _key_tiles.

    Rows past N need no mask in backward (their LSE reads as +inf, so their P is 0): a tile that
    reaches N counts as seen in full.
    """
    if CAUSAL:  # Q0 + i >= j
        lo = _clamp(k_lo - Q0, 0, N)
        full_lo = _clamp(k_hi - Q0, 0, N)
    else:
        lo = 0
        full_lo = 0
    if HAS_WINDOW:  # Q0 + i < j + window
        hi = _clamp(k_hi - Q0 + window, 0, N)
        full_hi = _clamp(k_lo - Q0 + window, 0, N)
        f1 = tl.where(full_hi >= N, tl.cdiv(N, BLOCK_M), full_hi // BLOCK_M)
    else:
        hi = N
        f1 = tl.cdiv(N, BLOCK_M)
    t_lo = lo // BLOCK_M
    t_hi = tl.maximum(tl.cdiv(hi, BLOCK_M), t_lo)
    t_f0 = _clamp(tl.cdiv(full_lo, BLOCK_M), t_lo, t_hi)
    t_f1 = _clamp(f1, t_f0, t_hi)
    return t_lo, t_f0, t_f1, t_hi


@triton.jit
def _tanh(x):
    """tanh (tl has no tanh of its own on every backend), in float32 as the CPU kernels' tanh_approx: below
    |x| = 1/4 an odd Taylor polynomial (relative error < 3e-9), above it 2 sigmoid(2x) - 1 (a few ulp). The
    sigmoid form alone is exact only in absolute terms: near 0 it cancels, and the capped logit cap * tanh
    then carried cap times the dtype's round-off (float32, cap 30: a logit error of 2e-6 at any size)."""
    big = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    if x.dtype == tl.float64:  # round-off 1e-16 in absolute terms: within the float64 rule as it is
        return big
    x2 = x * x
    small = x * (1.0 + x2 * (-0.333333333 + x2 * (0.133333333 + x2 * (-0.0539682540 + x2 * 0.0218694885))))
    return tl.where(tl.abs(x) < 0.25, small, big)


@triton.jit
def _softcap(s, cap, HAS_SOFTCAP: tl.constexpr):
    """(cap * tanh(s / cap), its derivative 1 - tanh^2) for scaled logits s (cap in s's units)."""
    if HAS_SOFTCAP:
        t = _tanh(s / cap)
        s = cap * t
        dcap = 1.0 - t * t
    else:
        dcap = 1.0
    return s, dcap


@triton.jit
def _doc_pad_visible(vis, kpos, jl, L, pad_b, dlo, dhi, HAS_PAD: tl.constexpr, HAS_DOCS: tl.constexpr):
    """vis (queries x keys) with padded keys and other documents' keys hidden. pad_b: the padding mask of
    this batch row over absolute key positions; dlo, dhi: each query's document as keys [dlo, dhi)."""
    if HAS_PAD:
        pad = tl.load(pad_b + kpos, mask=jl < L, other=1)
        vis = vis & (pad[None, :] == 0)
    if HAS_DOCS:
        vis = vis & (kpos[None, :] >= dlo[:, None]) & (kpos[None, :] < dhi[:, None])
    return vis


@triton.jit
def _scores(q, k_t, qk_scale, slope, qpos, kpos, jl, L, window, pad_b, dlo, dhi, cap, MASKED: tl.constexpr,
            CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
            HAS_PAD: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
            DOT_PREC: tl.constexpr):
    """Logits of a (query tile, key tile), -inf where hidden, and the softcap's derivative; rows are
    queries, columns keys.

    Masked tiles also hide keys past the range's end (jl >= L), which read as zero vectors. With a
    padding mask or documents every visited tile is masked (the launch makes it so).
    """
    s, dcap = _softcap(_dot(q, k_t, DOT_PREC) * qk_scale, cap, HAS_SOFTCAP)
    if HAS_ALIBI:
        s -= slope * (qpos[:, None] - kpos[None, :]).to(s.dtype)
    if MASKED:
        vis = jl[None, :] < L
        if CAUSAL:
            vis = vis & (kpos[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            vis = vis & (kpos[None, :] > qpos[:, None] - window)
        vis = _doc_pad_visible(vis, kpos, jl, L, pad_b, dlo, dhi, HAS_PAD, HAS_DOCS)
        s = tl.where(vis, s, _NEG_INF)
    return s, dcap


@triton.jit
def _narrow_to_docs(t_lo, t_f0, t_f1, t_hi, lo, hi, rs, L, HAS_PAD: tl.constexpr, HAS_DOCS: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Tile spans of one range [rs, rs + L) (as _key_tiles / _query_tiles return them) narrowed to the
    positions [lo, hi) that documents allow; with documents or padding, every tile runs masked."""
    if HAS_DOCS:
        lo_t = _clamp(lo - rs, 0, L) // BLOCK
        hi_t = tl.cdiv(_clamp(hi - rs, 0, L), BLOCK)
        t_lo = tl.maximum(t_lo, lo_t)
        t_hi = tl.maximum(tl.minimum(t_hi, hi_t), t_lo)
    if HAS_PAD or HAS_DOCS:
        t_f0 = t_hi
        t_f1 = t_hi
    return t_lo, t_f0, t_f1, t_hi


@triton.jit
def _row_docs(DocStart, DocStop, b, L_all, pos, ok, HAS_DOCS: tl.constexpr):
    """Each row's document as keys [dlo, dhi) (rows at absolute positions pos), and their union's bounds
    over the rows that are real (ok); zeros without documents."""
    if HAS_DOCS:
        dlo = tl.load(DocStart + b * L_all + pos, mask=ok, other=0)
        dhi = tl.load(DocStop + b * L_all + pos, mask=ok, other=0)
        d_lo = tl.min(tl.where(ok, dlo, L_all), 0)
        d_hi = tl.max(tl.where(ok, dhi, 0), 0)
    else:
        dlo = pos * 0
        dhi = pos * 0
        d_lo = 0
        d_hi = 0
    return dlo, dhi, d_lo, d_hi


# --------------------------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_stage(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
               t_lo, t_hi, rs, L, qpos, slope, qk_scale, window, pad_b, dlo, dhi, cap,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_ALIBI: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DOCS: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
               EXP2: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over key tiles [t_lo, t_hi) of one range (K, V point at its (b, kv head))."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # The tile's start goes in 64-bit: start * stride overflows int32 on long sequences.
    start = tl.cast(t_lo * BLOCK_N, tl.int64)
    k_ptrs = K + start * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + start * stride_vn + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    for t in range(t_lo, t_hi):
        jl = t * BLOCK_N + offs_n
        k = _load_rows(k_ptrs, jl < L, offs_d, HEAD_D, BLOCK_D, MASKED)
        s, _ = _scores(q, tl.trans(k), qk_scale, slope, qpos, rs + jl, jl, L, window, pad_b, dlo, dhi, cap,
                       MASKED, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_PAD, HAS_DOCS, HAS_SOFTCAP, DOT_PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            # A row may see nothing yet (window edge, padding, or a padding row): subtract 0 instead of
            # -inf so that exp gives 0, not NaN; m_i itself stays -inf until a key is seen.
            m_use = tl.where(m_new == _NEG_INF, 0.0, m_new)
        else:
            m_use = m_new
        p = _exp(s - m_use[:, None], EXP2)
        alpha = _exp(m_i - m_use, EXP2)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_ptrs, jl < L, offs_dv, HEAD_DV, BLOCK_DV, MASKED)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _fwd_kernel(
    Q, K, V, MK, MV, Slopes, Pad, DocStart, DocStop, Sinks, Out, Lse,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mkb, stride_mkh, stride_mkn, stride_mkd,
    stride_mvb, stride_mvh, stride_mvn, stride_mvd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    H, HKV, N, M, Q0, window, scale_hi, scale_lo, cap, N_BUCKET, M_BUCKET,
    GROUP: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    ACC: tl.constexpr, EXP2: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Forward: out and lse of one query tile of one (b, h).

    Grid: (cdiv(N, BLOCK_M) * B * H,), 1-D so that B * H is not capped at 65535; the query tile is
    the fast index (neighbouring programs share K/V in L2), heaviest (last) tiles first.
    Tiles: q (BLOCK_M, BLOCK_D) kept in registers; K (BLOCK_N, BLOCK_D) and V (BLOCK_N, BLOCK_DV)
    streamed, first over the memory range, then over the current range.
    Masks: rows past N and head-dim padding on loads and stores only; per key range, tiles no row
    sees are skipped, tiles every row sees whole run unmasked, and the rest (causal diagonal, window
    edge, the range's partial last tile) get the elementwise mask. With a padding mask (Pad, (B, M + N)
    int8) or documents (DocStart, DocStop: (B, M + N) int32, each position's document as [start, stop)),
    tiles outside the rows' documents are skipped and every other tile is masked. Sinks: (H,), one more
    logit per row in the softmax's denominator.
    """
    pid = tl.program_id(0)
    n_m = tl.cdiv(N, BLOCK_M)
    tile = n_m - 1 - pid % n_m
    bh = pid // n_m
    b = (bh // H).to(tl.int64)
    h = bh % H
    hkv = (h // GROUP).to(tl.int64)

    i0 = tile * BLOCK_M
    arange_m = tl.arange(0, BLOCK_M)
    offs_m = i0 + arange_m
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N
    qpos = Q0 + offs_m

    q_ptrs = (Q + b * stride_qb + h.to(tl.int64) * stride_qh + tl.cast(i0, tl.int64) * stride_qn
              + arange_m[:, None] * stride_qn + offs_d[None, :] * stride_qd)
    q = _load_rows(q_ptrs, row_ok, offs_d, HEAD_D, BLOCK_D, True)

    # The scale arrives as two float32 halves so that float64 keeps it to ~1e-15.
    qk_scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + h).to(ACC)
        if EXP2:
            slope = slope * _LOG2E

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    m_i = tl.full([BLOCK_M], _NEG_INF, dtype=ACC)
    q_lo = Q0 + i0
    q_hi = Q0 + tl.minimum(i0 + BLOCK_M, N) - 1
    L_all = M + N
    pad_b = Pad + b * L_all
    dlo, dhi, d_lo, d_hi = _row_docs(DocStart, DocStop, b, L_all, qpos, row_ok, HAS_DOCS)

    for r in tl.static_range(2):
        if r == 0:  # memory: positions [0, M)
            rs = 0
            L = M
            Kr = MK + b * stride_mkb + hkv * stride_mkh
            Vr = MV + b * stride_mvb + hkv * stride_mvh
            skn, skd, svn, svd = stride_mkn, stride_mkd, stride_mvn, stride_mvd
        else:  # current segment: positions [M, M + N)
            rs = M
            L = N
            Kr = K + b * stride_kb + hkv * stride_kh
            Vr = V + b * stride_vb + hkv * stride_vh
            skn, skd, svn, svd = stride_kn, stride_kd, stride_vn, stride_vd
        t_lo, t_f0, t_f1, t_hi = _key_tiles(q_lo, q_hi, rs, L, window, CAUSAL, HAS_WINDOW, BLOCK_N)
        t_lo, t_f0, t_f1, t_hi = _narrow_to_docs(t_lo, t_f0, t_f1, t_hi, d_lo, d_hi, rs, L, HAS_PAD, HAS_DOCS,
                                                 BLOCK_N)
        acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, Kr, Vr, skn, skd, svn, svd, t_lo, t_f0, rs, L,
                                   qpos, slope, qk_scale, window, pad_b, dlo, dhi, cap, True, CAUSAL, HAS_WINDOW,
                                   HAS_ALIBI, HAS_PAD, HAS_DOCS, HAS_SOFTCAP, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV,
                                   BLOCK_N, EXP2, DOT_PREC)
        acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, Kr, Vr, skn, skd, svn, svd, t_f0, t_f1, rs, L,
                                   qpos, slope, qk_scale, window, pad_b, dlo, dhi, cap, False, CAUSAL, HAS_WINDOW,
                                   HAS_ALIBI, HAS_PAD, HAS_DOCS, HAS_SOFTCAP, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV,
                                   BLOCK_N, EXP2, DOT_PREC)
        acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, q, Kr, Vr, skn, skd, svn, svd, t_f1, t_hi, rs, L,
                                   qpos, slope, qk_scale, window, pad_b, dlo, dhi, cap, True, CAUSAL, HAS_WINDOW,
                                   HAS_ALIBI, HAS_PAD, HAS_DOCS, HAS_SOFTCAP, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV,
                                   BLOCK_N, EXP2, DOT_PREC)

    if HAS_SINKS:
        # The sink: one more logit in the denominator, carrying no value.
        sink = tl.load(Sinks + h).to(ACC)
        if EXP2:
            sink = sink * _LOG2E
        mm = tl.maximum(m_i, sink)
        mm = tl.where(mm == _NEG_INF, 0.0, mm)
        a = _exp(m_i - mm, EXP2)
        l_i = l_i * a + _exp(sink - mm, EXP2)
        acc = acc * a[:, None]
        m_i = mm
    # A row that saw no key (padding rows, or every visible key masked) ends with l_i == 0: out 0, lse -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if EXP2:
        lse = (m_i + tl.log2(l_safe)) * _LN2
    else:
        lse = m_i + tl.log(l_safe)
    lse = tl.where(l_i == 0.0, _NEG_INF, lse)

    o_ptrs = (Out + b * stride_ob + h.to(tl.int64) * stride_oh + tl.cast(i0, tl.int64) * stride_on
              + arange_m[:, None] * stride_on + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DV))
    lse_ptrs = Lse + b * stride_lb + h.to(tl.int64) * stride_lh + offs_m * stride_ln
    tl.store(lse_ptrs, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Backward: dk, dv.
# --------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_stage(dk, dv, k, v, Q, DO, Lse, Delta, stride_qn, stride_qd, stride_don, stride_dod,
                stride_ln, stride_dln, t_lo, t_hi, N, Q0, kpos, slope, qk_scale, window, kpad, dstart_b, dstop_b, cap,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_ALIBI: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DOCS: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                EXP2: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulates dk, dv (rows: the key tile) over query tiles [t_lo, t_hi) of one query head."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    start = tl.cast(t_lo * BLOCK_M, tl.int64)
    q_ptrs = Q + start * stride_qn + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    do_ptrs = DO + start * stride_don + offs_m[:, None] * stride_don + offs_dv[None, :] * stride_dod
    for t in range(t_lo, t_hi):
        i = t * BLOCK_M + offs_m
        row_ok = i < N
        q = _load_rows(q_ptrs, row_ok, offs_d, HEAD_D, BLOCK_D, True)
        do = _load_rows(do_ptrs, row_ok, offs_dv, HEAD_DV, BLOCK_DV, True)
        # +inf LSE makes padding rows' P exactly 0, so they need no mask of their own.
        lse = tl.load(Lse + i * stride_ln, mask=row_ok, other=_POS_INF)
        # A row that saw no key has LSE -inf: read as +inf, its P is 0 everywhere.
        lse = tl.where(lse == _NEG_INF, _POS_INF, lse)
        delta = tl.load(Delta + i * stride_dln, mask=row_ok, other=0.0)
        if EXP2:
            lse = lse * _LOG2E
        # Transposed scores (keys x queries): dk, dv accumulate along the key rows.
        qpos = Q0 + i
        s_t, dcap = _softcap(_dot(k, tl.trans(q), DOT_PREC) * qk_scale, cap, HAS_SOFTCAP)
        if HAS_ALIBI:
            s_t -= slope * (qpos[None, :] - kpos[:, None]).to(s_t.dtype)
        p_t = _prob(s_t - lse[None, :], EXP2)
        dp_t = _dot(v, tl.trans(do), DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :]) * dcap
        if MASKED:
            # Exact zeros on hidden pairs (after the exp, not -inf before it): a row whose LSE or delta
            # is NaN must not reach the keys it does not see.
            vis = row_ok[None, :]
            if CAUSAL:
                vis = vis & (kpos[:, None] <= qpos[None, :])
            if HAS_WINDOW:
                vis = vis & (kpos[:, None] > qpos[None, :] - window)
            if HAS_PAD:
                vis = vis & (kpad[:, None] == 0)
            if HAS_DOCS:
                dlo = tl.load(dstart_b + qpos, mask=row_ok, other=0)
                dhi = tl.load(dstop_b + qpos, mask=row_ok, other=0)
                vis = vis & (kpos[:, None] >= dlo[None, :]) & (kpos[:, None] < dhi[None, :])
            p_t = tl.where(vis, p_t, 0.0)
            ds_t = tl.where(vis, ds_t, 0.0)
        dv += _dot(p_t.to(do.dtype), do, DOT_PREC)
        dk += _dot(ds_t.to(q.dtype), q, DOT_PREC)
        q_ptrs += BLOCK_M * stride_qn
        do_ptrs += BLOCK_M * stride_don
    return dk, dv


@triton.jit
def _dkdv_tile(K, V, DK, DV, stride_kn, stride_kd, stride_vn, stride_vd,
               stride_dkn, stride_dkd, stride_dvn, stride_dvd,
               Q, DO, Lse, Delta, Slopes,
               stride_qb, stride_qh, stride_qn, stride_qd,
               stride_dob, stride_doh, stride_don, stride_dod,
               stride_lb, stride_lh, stride_ln, stride_dlb, stride_dlh, stride_dln,
               b, hkv, j0, rs, L, N, M, Q0, window, qk_scale, Pad, DocStart, DocStop, cap,
               GROUP: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
               HAS_PAD: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               ACC: tl.constexpr, EXP2: tl.constexpr, DOT_PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dk, dv of keys [j0, j0 + BLOCK_N) of the range [rs, rs + L); K, V, DK, DV at (b, kv head)."""
    arange_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    jl = j0 + arange_n
    key_ok = jl < L
    kpos = rs + jl
    start = tl.cast(j0, tl.int64)
    k = _load_rows(K + start * stride_kn + arange_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                   key_ok, offs_d, HEAD_D, BLOCK_D, True)
    v = _load_rows(V + start * stride_vn + arange_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                   key_ok, offs_dv, HEAD_DV, BLOCK_DV, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)

    k_lo = rs + j0
    k_hi = rs + tl.minimum(j0 + BLOCK_N, L) - 1
    t_lo, t_f0, t_f1, t_hi = _query_tiles(k_lo, k_hi, Q0, N, window, CAUSAL, HAS_WINDOW, BLOCK_M)
    L_all = M + N
    dstart_b = DocStart + b * L_all
    dstop_b = DocStop + b * L_all
    kpad = jl * 0
    if HAS_PAD:
        kpad = tl.load(Pad + b * L_all + kpos, mask=key_ok, other=1)
    # The queries of the keys' documents: positions [start of k_lo's document, stop of k_hi's).
    q_from = 0
    q_to = 0
    if HAS_DOCS:
        q_from = tl.load(dstart_b + k_lo) - M
        q_to = tl.load(dstop_b + k_hi) - M
    t_lo, t_f0, t_f1, t_hi = _narrow_to_docs(t_lo, t_f0, t_f1, t_hi, q_from, q_to, 0, N, HAS_PAD, HAS_DOCS, BLOCK_M)
    for g in range(GROUP):
        h = (hkv * GROUP + g).to(tl.int64)
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Slopes + h).to(ACC)
            if EXP2:
                slope = slope * _LOG2E
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_dob + h * stride_doh
        Lh = Lse + b * stride_lb + h * stride_lh
        DLh = Delta + b * stride_dlb + h * stride_dlh
        dk, dv = _dkdv_stage(dk, dv, k, v, Qh, DOh, Lh, DLh, stride_qn, stride_qd, stride_don,
                             stride_dod, stride_ln, stride_dln, t_lo, t_f0, N, Q0, kpos, slope,
                             qk_scale, window, kpad, dstart_b, dstop_b, cap, True, CAUSAL,
                             HAS_WINDOW, HAS_ALIBI, HAS_PAD, HAS_DOCS, HAS_SOFTCAP, HEAD_D, HEAD_DV,
                             BLOCK_D, BLOCK_DV, BLOCK_M, EXP2, DOT_PREC)
        dk, dv = _dkdv_stage(dk, dv, k, v, Qh, DOh, Lh, DLh, stride_qn, stride_qd, stride_don,
                             stride_dod, stride_ln, stride_dln, t_f0, t_f1, N, Q0, kpos, slope,
                             qk_scale, window, kpad, dstart_b, dstop_b, cap, False, CAUSAL,
                             HAS_WINDOW, HAS_ALIBI, HAS_PAD, HAS_DOCS, HAS_SOFTCAP, HEAD_D, HEAD_DV,
                             BLOCK_D, BLOCK_DV, BLOCK_M, EXP2, DOT_PREC)
        dk, dv = _dkdv_stage(dk, dv, k, v, Qh, DOh, Lh, DLh, stride_qn, stride_qd, stride_don,
                             stride_dod, stride_ln, stride_dln, t_f1, t_hi, N, Q0, kpos, slope,
                             qk_scale, window, kpad, dstart_b, dstop_b, cap, True, CAUSAL,
                             HAS_WINDOW, HAS_ALIBI, HAS_PAD, HAS_DOCS, HAS_SOFTCAP, HEAD_D, HEAD_DV,
                             BLOCK_D, BLOCK_DV, BLOCK_M, EXP2, DOT_PREC)
    # The logits' scale, in natural units (qk_scale carries log2(e) when EXP2).
    if EXP2:
        dk = dk * (qk_scale * _LN2)
    else:
        dk = dk * qk_scale
    tl.store(DK + start * stride_dkn + arange_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=key_ok[:, None] & (offs_d[None, :] < HEAD_D))
    tl.store(DV + start * stride_dvn + arange_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=key_ok[:, None] & (offs_dv[None, :] < HEAD_DV))


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _dkdv_kernel(
    Q, K, V, MK, MV, DO, Lse, Delta, Slopes, Pad, DocStart, DocStop, DK, DV, DMK, DMV,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mkb, stride_mkh, stride_mkn, stride_mkd,
    stride_mvb, stride_mvh, stride_mvn, stride_mvd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lb, stride_lh, stride_ln,
    stride_dlb, stride_dlh, stride_dln,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dmkb, stride_dmkh, stride_dmkn, stride_dmkd,
    stride_dmvb, stride_dmvh, stride_dmvn, stride_dmvd,
    H, HKV, N, M, Q0, window, scale_hi, scale_lo, cap, N_BUCKET, M_BUCKET,
    GROUP: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ACC: tl.constexpr, EXP2: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward, keys' side: dk, dv (or dmem_k, dmem_v) of one key tile of one (b, kv head).

    Grid: ((cdiv(M, BLOCK_N) + cdiv(N, BLOCK_N)) * B * HKV,), 1-D; key tile fastest. The first
    cdiv(M, BLOCK_N) tiles are memory keys, the rest current keys: a tile is never split.
    Tiles: k (BLOCK_N, BLOCK_D), v (BLOCK_N, BLOCK_DV), dk, dv in registers; for each of the GROUP
    query heads of the kv head, q (BLOCK_M, BLOCK_D), dout (BLOCK_M, BLOCK_DV), lse and delta
    streamed over the query tiles that see the key tile, P recomputed from the saved LSE.
    Masks: causal diagonal and window edge tiles only; padding query rows have +inf LSE (P = 0),
    padding key rows are computed but not stored.
    """
    pid = tl.program_id(0)
    n_mem = tl.cdiv(M, BLOCK_N)
    n_t = n_mem + tl.cdiv(N, BLOCK_N)
    tile = pid % n_t
    bk = pid // n_t
    b = (bk // HKV).to(tl.int64)
    hkv = bk % HKV
    hkv64 = hkv.to(tl.int64)
    qk_scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    # Two calls, not pointers chosen by a branch: each range keeps its own (possibly constant) strides.
    if tile < n_mem:
        _dkdv_tile(MK + b * stride_mkb + hkv64 * stride_mkh, MV + b * stride_mvb + hkv64 * stride_mvh,
                   DMK + b * stride_dmkb + hkv64 * stride_dmkh, DMV + b * stride_dmvb + hkv64 * stride_dmvh,
                   stride_mkn, stride_mkd, stride_mvn, stride_mvd,
                   stride_dmkn, stride_dmkd, stride_dmvn, stride_dmvd,
                   Q, DO, Lse, Delta, Slopes,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_dob, stride_doh, stride_don, stride_dod,
                   stride_lb, stride_lh, stride_ln, stride_dlb, stride_dlh, stride_dln,
                   b, hkv, tile * BLOCK_N, 0, M, N, M, Q0, window, qk_scale, Pad, DocStart, DocStop, cap,
                   GROUP, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, CAUSAL, HAS_WINDOW, HAS_ALIBI,
                   HAS_PAD, HAS_DOCS, HAS_SOFTCAP, ACC, EXP2, DOT_PREC, BLOCK_M, BLOCK_N)
    else:
        _dkdv_tile(K + b * stride_kb + hkv64 * stride_kh, V + b * stride_vb + hkv64 * stride_vh,
                   DK + b * stride_dkb + hkv64 * stride_dkh, DV + b * stride_dvb + hkv64 * stride_dvh,
                   stride_kn, stride_kd, stride_vn, stride_vd,
                   stride_dkn, stride_dkd, stride_dvn, stride_dvd,
                   Q, DO, Lse, Delta, Slopes,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_dob, stride_doh, stride_don, stride_dod,
                   stride_lb, stride_lh, stride_ln, stride_dlb, stride_dlh, stride_dln,
                   b, hkv, (tile - n_mem) * BLOCK_N, M, N, N, M, Q0, window, qk_scale, Pad, DocStart, DocStop,
                   cap, GROUP, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, CAUSAL, HAS_WINDOW, HAS_ALIBI,
                   HAS_PAD, HAS_DOCS, HAS_SOFTCAP, ACC, EXP2, DOT_PREC, BLOCK_M, BLOCK_N)


# --------------------------------------------------------------------------------------------
# Backward: dq.
# --------------------------------------------------------------------------------------------
@triton.jit
def _dq_stage(dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
              t_lo, t_hi, rs, L, qpos, slope, qk_scale, window, pad_b, dlo, dhi, cap,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_ALIBI: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DOCS: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
              EXP2: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulates dq (unscaled) over key tiles [t_lo, t_hi) of one range."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    start = tl.cast(t_lo * BLOCK_N, tl.int64)
    k_ptrs = K + start * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + start * stride_vn + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    for t in range(t_lo, t_hi):
        jl = t * BLOCK_N + offs_n
        k = _load_rows(k_ptrs, jl < L, offs_d, HEAD_D, BLOCK_D, MASKED)
        v = _load_rows(v_ptrs, jl < L, offs_dv, HEAD_DV, BLOCK_DV, MASKED)
        s, dcap = _scores(q, tl.trans(k), qk_scale, slope, qpos, rs + jl, jl, L, window, pad_b, dlo, dhi, cap,
                          MASKED, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_PAD, HAS_DOCS, HAS_SOFTCAP, DOT_PREC)
        p = _prob(s - lse[:, None], EXP2)
        dp = _dot(do, tl.trans(v), DOT_PREC)
        ds = p * (dp - delta[:, None]) * dcap
        dq += _dot(ds.to(k.dtype), k, DOT_PREC)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _dq_kernel(
    Q, K, V, MK, MV, DO, Lse, Delta, Slopes, Pad, DocStart, DocStop, DQ,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mkb, stride_mkh, stride_mkn, stride_mkd,
    stride_mvb, stride_mvh, stride_mvn, stride_mvd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lb, stride_lh, stride_ln,
    stride_dlb, stride_dlh, stride_dln,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    H, HKV, N, M, Q0, window, scale_hi, scale_lo, cap, N_BUCKET, M_BUCKET,
    GROUP: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ACC: tl.constexpr, EXP2: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward, queries' side: dq of one query tile of one (b, h); no atomics, deterministic.

    Grid: (cdiv(N, BLOCK_M) * B * H,), 1-D, as the forward.
    Tiles: q (BLOCK_M, BLOCK_D), dout (BLOCK_M, BLOCK_DV), lse, delta and dq in registers; K, V
    streamed over the memory range, then the current range, P recomputed from the saved LSE.
    Masks: as the forward (skip hidden tiles, mask diagonal / window edge / range-tail tiles).
    """
    pid = tl.program_id(0)
    n_m = tl.cdiv(N, BLOCK_M)
    tile = n_m - 1 - pid % n_m
    bh = pid // n_m
    b = (bh // H).to(tl.int64)
    h = bh % H
    h64 = h.to(tl.int64)
    hkv = (h // GROUP).to(tl.int64)

    i0 = tile * BLOCK_M
    arange_m = tl.arange(0, BLOCK_M)
    offs_m = i0 + arange_m
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N
    qpos = Q0 + offs_m
    start = tl.cast(i0, tl.int64)

    q = _load_rows(Q + b * stride_qb + h64 * stride_qh + start * stride_qn
                   + arange_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                   row_ok, offs_d, HEAD_D, BLOCK_D, True)
    do = _load_rows(DO + b * stride_dob + h64 * stride_doh + start * stride_don
                    + arange_m[:, None] * stride_don + offs_dv[None, :] * stride_dod,
                    row_ok, offs_dv, HEAD_DV, BLOCK_DV, True)
    # +inf LSE zeroes the padding rows' P (they are not stored, but stay finite).
    lse = tl.load(Lse + b * stride_lb + h64 * stride_lh + offs_m * stride_ln, mask=row_ok, other=_POS_INF)
    lse = tl.where(lse == _NEG_INF, _POS_INF, lse)  # a row that saw no key: P = 0 everywhere
    delta = tl.load(Delta + b * stride_dlb + h64 * stride_dlh + offs_m * stride_dln, mask=row_ok, other=0.0)
    if EXP2:
        lse = lse * _LOG2E
    qk_scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + h).to(ACC)
        if EXP2:
            slope = slope * _LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    q_lo = Q0 + i0
    q_hi = Q0 + tl.minimum(i0 + BLOCK_M, N) - 1
    L_all = M + N
    pad_b = Pad + b * L_all
    dlo, dhi, d_lo, d_hi = _row_docs(DocStart, DocStop, b, L_all, qpos, row_ok, HAS_DOCS)
    for r in tl.static_range(2):
        if r == 0:
            rs = 0
            L = M
            Kr = MK + b * stride_mkb + hkv * stride_mkh
            Vr = MV + b * stride_mvb + hkv * stride_mvh
            skn, skd, svn, svd = stride_mkn, stride_mkd, stride_mvn, stride_mvd
        else:
            rs = M
            L = N
            Kr = K + b * stride_kb + hkv * stride_kh
            Vr = V + b * stride_vb + hkv * stride_vh
            skn, skd, svn, svd = stride_kn, stride_kd, stride_vn, stride_vd
        t_lo, t_f0, t_f1, t_hi = _key_tiles(q_lo, q_hi, rs, L, window, CAUSAL, HAS_WINDOW, BLOCK_N)
        t_lo, t_f0, t_f1, t_hi = _narrow_to_docs(t_lo, t_f0, t_f1, t_hi, d_lo, d_hi, rs, L, HAS_PAD, HAS_DOCS,
                                                 BLOCK_N)
        dq = _dq_stage(dq, q, do, lse, delta, Kr, Vr, skn, skd, svn, svd, t_lo, t_f0, rs, L, qpos,
                       slope, qk_scale, window, pad_b, dlo, dhi, cap, True, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_PAD,
                       HAS_DOCS, HAS_SOFTCAP, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, EXP2, DOT_PREC)
        dq = _dq_stage(dq, q, do, lse, delta, Kr, Vr, skn, skd, svn, svd, t_f0, t_f1, rs, L, qpos,
                       slope, qk_scale, window, pad_b, dlo, dhi, cap, False, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_PAD,
                       HAS_DOCS, HAS_SOFTCAP, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, EXP2, DOT_PREC)
        dq = _dq_stage(dq, q, do, lse, delta, Kr, Vr, skn, skd, svn, svd, t_f1, t_hi, rs, L, qpos,
                       slope, qk_scale, window, pad_b, dlo, dhi, cap, True, CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_PAD,
                       HAS_DOCS, HAS_SOFTCAP, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, EXP2, DOT_PREC)
    if EXP2:
        dq = dq * (qk_scale * _LN2)
    else:
        dq = dq * qk_scale
    tl.store(DQ + b * stride_dqb + h64 * stride_dqh + start * stride_dqn
             + arange_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D))


# --------------------------------------------------------------------------------------------
# Decode: few query rows per kv head (flash-decoding). One program per (split of the keys, b, kv head)
# takes the GQA group's R = G * N query rows together, so each key and value row is read once per group;
# the splits' partial results are combined by their LSE in a second kernel.
# --------------------------------------------------------------------------------------------
@triton.jit
def _decode_split_kernel(
    Q, K, V, MK, MV, Slopes, Pad, DocStart, DocStop, OutPart, LsePart,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mkb, stride_mkh, stride_mkn, stride_mkd,
    stride_mvb, stride_mvh, stride_mvn, stride_mvd,
    HKV, N, M, window, key_lo, split_len, n_splits, scale_hi, scale_lo, cap,
    GROUP: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ACC: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One split of keys [key_lo + s * split_len, ...) for all R rows of (b, kv head).

    Grid: (n_splits * B * HKV,). Rows r = g * N + i: head hkv * GROUP + g, query i (position M + i);
    padded to BLOCK_R (>= 16 for tl.dot), the padding masked. Keys of the split come from the memory
    range and then the current one; every tile is masked (causal, window, range end): decoding is bound by
    the reads of K and V, not by the mask. Writes o = acc / l (zero where the split sees nothing) and
    lse = m + log(l) (-inf there) per row into OutPart (n_splits, B, HKV, BLOCK_R, Dv), LsePart.
    """
    pid = tl.program_id(0)
    split = pid % n_splits
    bg = pid // n_splits
    b = (bg // HKV).to(tl.int64)
    hkv = (bg % HKV).to(tl.int64)
    R = GROUP * N
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_r < R
    g = offs_r // N
    i = offs_r % N
    h = hkv * GROUP + g
    qpos = M + i
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    q_ptrs = (Q + b * stride_qb + h.to(tl.int64)[:, None] * stride_qh + i.to(tl.int64)[:, None] * stride_qn
              + offs_d[None, :] * stride_qd)
    q = _load_rows(q_ptrs, row_ok, offs_d, HEAD_D, BLOCK_D, True)
    qk_scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    slope = tl.zeros([BLOCK_R], dtype=ACC)
    if HAS_ALIBI:
        slope = tl.load(Slopes + h, mask=row_ok, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=ACC)
    l_i = tl.zeros([BLOCK_R], dtype=ACC)
    m_i = tl.full([BLOCK_R], _NEG_INF, dtype=ACC)
    s0 = key_lo + split * split_len
    s1 = tl.minimum(s0 + split_len, M + N)
    L_all = M + N
    pad_b = Pad + b * L_all
    dlo, dhi, d_lo, d_hi = _row_docs(DocStart, DocStop, b, L_all, qpos, row_ok, HAS_DOCS)
    if HAS_DOCS:  # only the keys of the rows' documents
        s0 = tl.maximum(s0, d_lo)
        s1 = tl.minimum(s1, d_hi)
    for r in tl.static_range(2):
        if r == 0:  # memory: positions [0, M)
            rs = 0
            L = M
            Kr = MK + b * stride_mkb + hkv * stride_mkh
            Vr = MV + b * stride_mvb + hkv * stride_mvh
            skn, skd, svn, svd = stride_mkn, stride_mkd, stride_mvn, stride_mvd
        else:  # current segment: positions [M, M + N)
            rs = M
            L = N
            Kr = K + b * stride_kb + hkv * stride_kh
            Vr = V + b * stride_vb + hkv * stride_vh
            skn, skd, svn, svd = stride_kn, stride_kd, stride_vn, stride_vd
        lo = tl.maximum(s0, rs) - rs
        hi = tl.minimum(s1, rs + L) - rs
        for j0 in range(lo, hi, BLOCK_N):
            jl = j0 + offs_n
            kvalid = jl < hi
            kpos = rs + jl
            k = tl.load(Kr + tl.cast(jl, tl.int64)[:, None] * skn + offs_d[None, :] * skd,
                        mask=kvalid[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
            v = tl.load(Vr + tl.cast(jl, tl.int64)[:, None] * svn + offs_dv[None, :] * svd,
                        mask=kvalid[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
            s, _ = _softcap(_dot(q, tl.trans(k), DOT_PREC).to(ACC) * qk_scale, cap, HAS_SOFTCAP)
            if HAS_ALIBI:
                s -= slope[:, None] * (qpos[:, None] - kpos[None, :]).to(ACC)
            vis = kvalid[None, :] & row_ok[:, None]
            if CAUSAL:
                vis = vis & (kpos[None, :] <= qpos[:, None])
            if HAS_WINDOW:
                vis = vis & (kpos[None, :] > qpos[:, None] - window)
            vis = _doc_pad_visible(vis, kpos, jl, hi, pad_b, dlo, dhi, HAS_PAD, HAS_DOCS)
            s = tl.where(vis, s, _NEG_INF)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == _NEG_INF, 0.0, m_new)
            p = tl.exp(s - m_use[:, None])
            alpha = tl.exp(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC).to(ACC)
            m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, _NEG_INF, m_i + tl.log(l_safe))
    base = pid.to(tl.int64) * BLOCK_R  # (split, b, hkv) -> (bg * n_splits + split): pid itself
    tl.store(OutPart + (base + offs_r)[:, None] * HEAD_DV + offs_dv[None, :], out,
             mask=(offs_dv[None, :] < HEAD_DV))
    tl.store(LsePart + base + offs_r, lse)


@triton.jit
def _decode_combine_kernel(
    OutPart, LsePart, Sinks, Out, Lse,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    HKV, N, n_splits,
    GROUP: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_S: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    """out and lse of one row (b, h, i) from the splits' partial results: lse = logsumexp_s lse_s,
    out = sum_s exp(lse_s - lse) o_s, in float32 (float64 for float64). The head's sink, if any, is one
    more term of the sum that carries no value. A row no split saw: out 0, lse -inf.
    Grid: (B * HKV * GROUP * N,)."""
    pid = tl.program_id(0)
    R = GROUP * N
    r = pid % R
    bg = pid // R
    b = bg // HKV
    hkv = bg % HKV
    h = hkv * GROUP + r // N
    i = r % N
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < n_splits
    rows = (bg.to(tl.int64) * n_splits + offs_s) * BLOCK_R + r
    lse_s = tl.load(LsePart + rows, mask=s_ok, other=_NEG_INF)
    mx = tl.max(lse_s, 0)
    if HAS_SINKS:
        sink = tl.load(Sinks + h).to(lse_s.dtype)
        mx = tl.maximum(mx, sink)
    mx_use = tl.where(mx == _NEG_INF, 0.0, mx)
    w = tl.exp(lse_s - mx_use)
    den = tl.sum(w, 0)
    if HAS_SINKS:
        den += tl.exp(sink - mx_use)
    o = tl.load(OutPart + rows[:, None] * HEAD_DV + offs_dv[None, :], mask=s_ok[:, None] & (offs_dv[None, :] < HEAD_DV),
                other=0.0)
    den_safe = tl.where(den == 0.0, 1.0, den)
    out = tl.sum(o * w[:, None], 0) / den_safe
    lse = tl.where(den == 0.0, _NEG_INF, mx_use + tl.log(den_safe))
    tl.store(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + i.to(tl.int64) * stride_on
             + offs_dv * stride_od, out.to(Out.dtype.element_ty), mask=offs_dv < HEAD_DV)
    tl.store(Lse + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + i.to(tl.int64) * stride_ln, lse)


# Few-query calls take the decode kernels: N queries, G * N rows per kv head at most.
DECODE_MAX_ROWS = 64
DECODE_MAX_QUERIES = 16
# Keys per split under the interpreter (small, so that tests exercise the combination); on a GPU the
# splits are sized to give every multiprocessor a few programs.
INTERPRETER_SPLIT = 48
# Keys per step of the split kernel's loop (tests may change the interpreter's).
INTERPRETER_DECODE_BLOCK_N = 16
GPU_DECODE_BLOCK_N = 64


def use_decode(q, k) -> bool:
    N, group = q.shape[2], q.shape[1] // k.shape[1]
    return N <= DECODE_MAX_QUERIES and group * N <= DECODE_MAX_ROWS


def _splits(B, HKV, keys, device) -> int:
    if _INTERPRET:
        return max(1, triton.cdiv(keys, INTERPRETER_SPLIT))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    n = max(1, triton.cdiv(2 * sms, B * HKV))
    return max(1, min(n, triton.cdiv(keys, 256)))


def decode_fwd(q, k, v, mem_k, mem_v, alibi_slopes, causal: bool, window: int, scale: float, masks=None):
    B, H, N, D = q.shape
    HKV, Dv, M = k.shape[1], v.shape[-1], mem_k.shape[2]
    group = H // HKV
    out = torch.empty((B, H, N, Dv), dtype=q.dtype, device=q.device)
    acc_dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.empty((B, H, N), dtype=acc_dt, device=q.device)
    key_lo = max(0, M - window + 1) if (window and causal) else 0
    keys = M + N - key_lo
    n_splits = _splits(B, HKV, keys, q.device)
    split_len = triton.cdiv(keys, n_splits)
    block_r = max(16, triton.next_power_of_2(group * N))
    part_o = torch.empty((n_splits * B * HKV * block_r, Dv), dtype=acc_dt, device=q.device)
    part_l = torch.empty((n_splits * B * HKV * block_r,), dtype=acc_dt, device=q.device)
    f64 = q.dtype == torch.float64
    scale_hi, scale_lo = _f32_halves(scale)
    meta = dict(GROUP=group, HEAD_D=D, HEAD_DV=Dv, BLOCK_R=block_r,
                BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
                BLOCK_N=INTERPRETER_DECODE_BLOCK_N if _INTERPRET else GPU_DECODE_BLOCK_N,
                CAUSAL=bool(causal), HAS_WINDOW=window > 0,
                HAS_ALIBI=alibi_slopes is not None, ACC=tl.float64 if f64 else tl.float32,
                DOT_PREC=dot_precision(q.dtype),
                HAS_PAD=masks.pad is not None, HAS_DOCS=masks.start is not None, HAS_SOFTCAP=masks.cap > 0)
    if not _INTERPRET:
        meta.update(num_warps=4, num_stages=3)
    _decode_split_kernel[(n_splits * B * HKV,)](
        q, k, v, mem_k, mem_v, alibi_slopes, *masks.pointers(), part_o, part_l,
        *q.stride(), *k.stride(), *v.stride(), *mem_k.stride(), *mem_v.stride(),
        HKV, N, M, int(window), key_lo, split_len, n_splits, scale_hi, scale_lo, masks.cap, **meta, **LAUNCH_OPTIONS)
    _decode_combine_kernel[(B * HKV * group * N,)](
        part_o, part_l, masks.sinks_pointer(), out, lse, *out.stride(), *lse.stride(), HKV, N, n_splits,
        GROUP=group, HEAD_DV=Dv, BLOCK_R=block_r, BLOCK_DV=meta["BLOCK_DV"],
        BLOCK_S=max(2, triton.next_power_of_2(n_splits)), HAS_SINKS=masks.sinks is not None, **LAUNCH_OPTIONS)
    return out, lse


# --------------------------------------------------------------------------------------------
# Configurations. On GPU, autotuned per head dims, mask kind and sequence-length bucket (powers of
# two, so varying lengths do not re-tune every call); configs that overflow shared memory or
# registers are discarded by the autotuner itself.
# --------------------------------------------------------------------------------------------
_TUNE_KEY = ["HEAD_D", "HEAD_DV", "GROUP", "CAUSAL", "HAS_WINDOW", "HAS_ALIBI", "HAS_PAD", "HAS_DOCS", "HAS_SOFTCAP",
             "N_BUCKET", "M_BUCKET"]


def _configs(shapes):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


def _prune(max_tile):
    """Drops tiles whose register/shared-memory footprint grows past what a head dim > 128 allows."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}  # the head-dim tiles arrive as keyword arguments
        big = max(args["BLOCK_D"], args["BLOCK_DV"]) > 128
        kept = [c for c in configs if not big or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= max_tile]
        return kept or configs[-1:]
    return prune


# Forward and dq: long query tiles, keys streamed. dkdv: long key tiles, queries streamed.
_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (128, 128, 8, 2),
                         (64, 64, 4, 3), (64, 32, 4, 2)])
_DQ_CONFIGS = _configs([(128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2)])
# dkdv holds dk, dv and its key tiles across the query loop: every config here spills on sm_90 (255 registers,
# 0.3-1.8 KB of stack) except 16-row query steps, (16, 128, 8, 2): none at D = 64, 72 B at D = 128.
_DKDV_CONFIGS = _configs([(32, 128, 8, 2), (16, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2)])


def _tuned(kernel, configs, max_tile):
    return triton.autotune(configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune(max_tile)})(kernel)


# float32 inputs take IEEE dot products, which Triton lowers to FMA loops that hold whole rows of both
# operands in registers: the tiles above spill 7-15 KB per thread there on sm_90 and take 0.5-2.5 minutes
# each to compile (tests/triton_compile.py). Short query tiles spill little or nothing (dq: none at D = 128;
# the forward none at D = 64, < 1.1 KB at D = 128) and compile in 10-20 s.
_FWD_CONFIGS_IEEE = _configs([(64, 32, 8, 2), (32, 16, 4, 2), (32, 32, 4, 2)])
_DQ_CONFIGS_IEEE = _configs([(64, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 2)])
_DKDV_CONFIGS_IEEE = _configs([(32, 128, 8, 2), (32, 64, 4, 3), (32, 32, 4, 2)])

# name: (configs, largest BLOCK_M x BLOCK_N kept for head dims > 128); "_ieee": float32's lists
_CONFIG_LISTS = {"fwd": (_FWD_CONFIGS, 64 * 64), "dq": (_DQ_CONFIGS, 64 * 64), "dkdv": (_DKDV_CONFIGS, 32 * 64),
                 "fwd_ieee": (_FWD_CONFIGS_IEEE, 64 * 64), "dq_ieee": (_DQ_CONFIGS_IEEE, 64 * 64),
                 "dkdv_ieee": (_DKDV_CONFIGS_IEEE, 32 * 64)}
_KERNELS = {"fwd": _fwd_kernel, "dq": _dq_kernel, "dkdv": _dkdv_kernel}
_TUNED = {} if _INTERPRET else {
    name: _tuned(_KERNELS[name.split("_")[0]], configs, max_tile) for name, (configs, max_tile) in _CONFIG_LISTS.items()
}


def _launch(kernel, name, grid, args, meta):
    if _INTERPRET:
        bm, bn = INTERPRETER_BLOCKS[name]
        kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn)
        return
    if meta["DOT_PREC"] == "ieee":
        name += "_ieee"
    if not autotune_enabled():
        configs, max_tile = _CONFIG_LISTS[name]
        launch_first_fitting(kernel, grid, args, meta, configs, prune=_prune(max_tile))
    else:
        _TUNED[name][grid](*args, **meta, **LAUNCH_OPTIONS)


# --------------------------------------------------------------------------------------------
# Launchers.
# --------------------------------------------------------------------------------------------
def _f32_halves(x: float) -> tuple[float, float]:
    """x as hi + lo, both float32 values: Triton passes Python floats as float32."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    lo = struct.unpack("f", struct.pack("f", x - hi))[0]
    return hi, lo


class _Masks:
    """The masks and score terms as the kernels take them: the padding mask as int8 (B, M + N), each
    position's document as keys [start, stop) (int32 (B, M + N), from the sorted ids by binary search),
    the softcap in the logits' units (0: none) and the sinks (H,) in the LSE's dtype."""

    def __init__(self, q, key_padding_mask=None, document_ids=None, softcap=0.0, sinks=None, exp2=False):
        self.pad = None if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
        self.start = self.stop = None
        if document_ids is not None:
            ids = document_ids.to(torch.int64).contiguous()
            self.start = torch.searchsorted(ids, ids, right=False).to(torch.int32)
            self.stop = torch.searchsorted(ids, ids, right=True).to(torch.int32)
        self.cap = float(softcap) * (math.log2(math.e) if exp2 and softcap else 1.0)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.sinks = None if sinks is None else sinks.to(acc).contiguous()

        # Unused pointers still get a tensor: kernels form addresses from them before the flags prune the loads.
        self._dummy = torch.zeros(1, dtype=torch.int32, device=q.device)

    def meta(self):
        return dict(HAS_PAD=self.pad is not None, HAS_DOCS=self.start is not None, HAS_SOFTCAP=self.cap > 0)

    def pointers(self):
        """(Pad, DocStart, DocStop) as the kernels take them."""
        return tuple(self._dummy if t is None else t for t in (self.pad, self.start, self.stop))

    def sinks_pointer(self):
        return self._dummy if self.sinks is None else self.sinks


def _meta(q, k, v, alibi_slopes, causal, window, scale):
    """Compile-time constants and the scale shared by the three kernels."""
    f64 = q.dtype == torch.float64
    exp2 = not f64
    D, Dv = q.shape[-1], v.shape[-1]
    meta = dict(
        GROUP=q.shape[1] // k.shape[1], HEAD_D=D, HEAD_DV=Dv,
        # tl.dot needs every dimension >= 16.
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
        CAUSAL=bool(causal), HAS_WINDOW=window > 0, HAS_ALIBI=alibi_slopes is not None,
        ACC=tl.float64 if f64 else tl.float32, EXP2=exp2,
        # float16/bfloat16 dots are exact products with float32 sums anyway; float32 must not drop to TF32.
        DOT_PREC=dot_precision(q.dtype),
    )
    scale_hi, scale_lo = _f32_halves(scale * math.log2(math.e) if exp2 else scale)
    return meta, scale_hi, scale_lo


def _ints(q, k, mem_k, window, q0=None):
    """(H, HKV, N, M, Q0, window): Q0 is query 0's position (M unless a ring step places the queries)."""
    B, H, N, _ = q.shape
    M = mem_k.shape[2]
    return (H, k.shape[1], N, M, M if q0 is None else int(q0), int(window))


def _buckets(N, M):
    return triton.next_power_of_2(N), triton.next_power_of_2(max(M, 1))


def memory_attention_fwd(q, k, v, mem_k, mem_v, alibi_slopes, causal: bool, window: int, scale: float,
                         key_padding_mask=None, document_ids=None, softcap: float = 0.0, sinks=None, q0=None):
    """(out (B, H, N, Dv) in q's dtype, lse (B, H, N) float32 / float64 for float64 inputs). ``q0``: query 0's
    position (default M)."""
    exp2 = q.dtype != torch.float64
    if use_decode(q, k) and (q0 is None or q0 == mem_k.shape[2]):
        masks = _Masks(q, key_padding_mask, document_ids, softcap, sinks, exp2=False)  # decode: natural units
        return decode_fwd(q, k, v, mem_k, mem_v, alibi_slopes, causal, window, scale, masks)
    masks = _Masks(q, key_padding_mask, document_ids, softcap, sinks, exp2=exp2)
    B, H, N, _ = q.shape
    M = mem_k.shape[2]
    out = torch.empty((B, H, N, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                      device=q.device)
    if out.numel() == 0:
        return out, lse
    meta, scale_hi, scale_lo = _meta(q, k, v, alibi_slopes, causal, window, scale)
    meta.update(masks.meta(), HAS_SINKS=masks.sinks is not None)
    args = (q, k, v, mem_k, mem_v, alibi_slopes, *masks.pointers(), masks.sinks_pointer(), out, lse,
            *q.stride(), *k.stride(), *v.stride(), *mem_k.stride(), *mem_v.stride(),
            *out.stride(), *lse.stride(),
            *_ints(q, k, mem_k, window, q0), scale_hi, scale_lo, masks.cap, *_buckets(N, M))
    grid = lambda META: (triton.cdiv(N, META["BLOCK_M"]) * B * H,)  # noqa: E731
    _launch(_fwd_kernel, "fwd", grid, args, meta)
    return out, lse


def memory_attention_bwd(dout, q, k, v, mem_k, mem_v, alibi_slopes, lse, delta, causal: bool, window: int,
                         scale: float, key_padding_mask=None, document_ids=None, softcap: float = 0.0, q0=None):
    """(dq, dk, dv, dmem_k, dmem_v) in the inputs' dtypes, shapes and memory layouts.

    Each gradient is laid out like its input (``empty_like``, as the op's fake implementation
    declares); the kernels write through its strides.
    """
    B, H, N, _ = q.shape
    Hkv = k.shape[1]
    M = mem_k.shape[2]
    dq, dk, dv, dmk, dmv = (torch.empty_like(t) for t in (q, k, v, mem_k, mem_v))
    if dq.numel() == 0 or dv.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dmk.zero_(), dmv.zero_()
    meta, scale_hi, scale_lo = _meta(q, k, v, alibi_slopes, causal, window, scale)
    masks = _Masks(q, key_padding_mask, document_ids, softcap, None, exp2=q.dtype != torch.float64)
    meta.update(masks.meta())
    tail = (*_ints(q, k, mem_k, window, q0), scale_hi, scale_lo, masks.cap, *_buckets(N, M))
    common = (*q.stride(), *k.stride(), *v.stride(), *mem_k.stride(), *mem_v.stride(),
              *dout.stride(), *lse.stride(), *delta.stride())
    mask_args = masks.pointers()

    args = (q, k, v, mem_k, mem_v, dout, lse, delta, alibi_slopes, *mask_args, dk, dv, dmk, dmv, *common,
            *dk.stride(), *dv.stride(), *dmk.stride(), *dmv.stride(), *tail)
    grid = lambda META: ((triton.cdiv(M, META["BLOCK_N"]) + triton.cdiv(N, META["BLOCK_N"])) * B * Hkv,)  # noqa: E731
    _launch(_dkdv_kernel, "dkdv", grid, args, meta)

    args = (q, k, v, mem_k, mem_v, dout, lse, delta, alibi_slopes, *mask_args, dq, *common, *dq.stride(), *tail)
    grid = lambda META: (triton.cdiv(N, META["BLOCK_M"]) * B * H,)  # noqa: E731
    _launch(_dq_kernel, "dq", grid, args, meta)
    return dq, dk, dv, dmk, dmv
