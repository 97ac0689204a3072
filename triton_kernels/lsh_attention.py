"""Triton kernels of LSH bucket sort-and-attend (Reformer; docs/semantics.md §2).

The math is ``longkernels/reference/lsh_attention.py``; the launchers take and return exactly what the op
schemas ``lsh_attention_fwd`` / ``lsh_attention_bwd`` in ``csrc/ops.cpp`` declare.

The sorted sequence is ``perm.flatten(2)``: ``NH * Lp`` slots (``NH`` rounds, ``Lp`` the padded length, a
multiple of the chunk size ``C``); slot ``s`` belongs to round ``s // Lp`` and holds the original position
``perm[b, h, s // Lp, s % Lp]`` (positions ``>= L`` are internal padding). It is cut into
``T = NH * Lp / C`` chunks, so a chunk never straddles two rounds. Query chunk ``t`` sees the key chunks
``(t + o) mod T`` for ``o = -n_chunks_before .. n_chunks_after``, one key tile per offset: the window wraps
around over the concatenated rounds, and a window longer than ``T`` visits chunks repeatedly and counts
them repeatedly, exactly as the reference's roll/cat does.

Nothing sorted is materialised: every kernel gathers the rows of ``qk``, ``v`` (and ``dout``) it needs
through ``perm``, by their strides, and normalises the key rows itself,
``k = x * rsqrt(mean(x^2) + 1e-6) / sqrt(D)``.

Masks, by original position, for a (query ``pq``, key ``pk``) entry:

* hidden, logit ``-1e9`` as in the reference: the key column is past the chunk (``j >= C``, a tile is
  ``BLOCK_C >= C`` rows), ``pk >= L``, ``key_padding_mask[b, pk]``, or, if causal, ``pk > pq``;
* self, logit ``-1e5`` replacing whatever it had (even for a padding key): ``pk == pq``.

Every real query row has its self entry (a chunk holds its own queries), so its maximum is ``>= -1e5``
and a hidden entry's exp is exactly 0: -1e9 excludes exactly, and no row is ever all -inf (no NaN paths).
Query rows that are not real (``i >= C``, or ``pq >= L``) are computed with finite values and never stored;
in backward they read ``lse_max = +inf``, so their P is exactly 0 and they contribute nothing.

Kernels (all deterministic, no atomics):

* ``_fwd_kernel``      one program per (query chunk, b, h): softmax over the window, online over the
                       window's key tiles; writes the round's ``(o_r, m_r, l_r)`` at the original positions
                       (with one round: the final ``out``, ``lse_max``, ``lse_log`` directly).
* ``_combine_kernel``  one program per (position tile, b, h), only with several rounds:
                       ``M = max_r m_r``, ``w_r = exp(m_r - M) l_r``, ``out = sum_r w_r o_r / sum_r w_r``,
                       ``lse_max = M``, ``lse_log = log(sum_r w_r)``.
* ``_dkdv_kernel``     one program per (key chunk, b, h): loops the query chunks that see it,
                       ``(c - o) mod T`` for each window offset ``o``; writes the round's dk, dv at the
                       key positions (each (round, position) is one slot: no conflicts).
* ``_dq_kernel``       one program per (query chunk, b, h): dq of the round at the query positions.

Per-round gradients are summed over the rounds by the launcher (one ``sum``; none with one round).
``lse_max`` and ``lse_log`` stay apart (``lse = lse_max + lse_log``): rows whose logits sit near the -1e5
self value keep full float32 precision, since backward forms ``(s - lse_max) - lse_log``.

Precision: softmax, normalisation and accumulation run in the compute type ACC (float32; float64 for float64
inputs, which run under the interpreter only). The dot products take their operands as the inputs are stored:
float32 with IEEE products (TF32 where torch allows it for float32 matrix products: ``tuning.dot_precision``),
float64 in float64; bfloat16/float16 rows as loaded, the normalised keys, P and dS rounded to the input type
(FlashAttention's numerics, what memory attention does), so that the GPU multiplies them on its tensor cores
with float32 accumulation instead of lowering float32 IEEE products to FMA loops.
"""
from __future__ import annotations

import os
import struct

import torch
import triton
import triton.language as tl

from .memory_attention import _dot
from .tuning import LAUNCH_OPTIONS, autotune_enabled, dot_precision, launch_first_fitting

# Triton decides at decoration time whether kernels are interpreted; the launchers follow it.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Position tile of the combine kernel; under the interpreter small (tests may change it).
INTERPRETER_BLOCK_L = 16
GPU_BLOCK_L = 64

_MASK_VALUE = tl.constexpr(-1e9)  # hidden keys (reference MASK_VALUE); exact in float32
_SELF_VALUE = tl.constexpr(-1e5)  # the token itself (reference SELF_MASK_VALUE)
_NORM_EPS = tl.constexpr(1e-6)
_POS_INF = tl.constexpr(float("inf"))
_NEG_INF = tl.constexpr(float("-inf"))

# Lengths, chunk counts and window sizes vary from call to call: keep them runtime values so that one
# compiled kernel serves all of them (Triton would otherwise turn a value of 1 into a constant).
_RUNTIME_INTS = ["H", "L", "Lp", "T", "C", "NB", "NA", "NH"]


# --------------------------------------------------------------------------------------------
# Helpers shared by the kernels.
# --------------------------------------------------------------------------------------------
@triton.jit
def _chunk_positions(Perm, stride_pr, stride_pl, c, Lp, C, offs, OTHER):
    """Original positions of the slots of chunk ``c`` (Perm at (b, h)), ``OTHER`` past the chunk's end;
    and the chunk's round."""
    first = c * C  # < NH * Lp
    r = first // Lp
    pos = tl.load(Perm + r.to(tl.int64) * stride_pr + (first - r * Lp + offs).to(tl.int64) * stride_pl,
                  mask=offs < C, other=OTHER)
    return pos, r


@triton.jit
def _gather_rows(X, stride_n, stride_d, pos, ok, cols, NCOL: tl.constexpr, ACC: tl.constexpr):
    """Rows ``pos`` (where ``ok``) of X (at (b, h)) as an ACC tile; other rows and columns past NCOL are 0."""
    ptrs = X + pos.to(tl.int64)[:, None] * stride_n + cols[None, :] * stride_d
    return tl.load(ptrs, mask=ok[:, None] & (cols[None, :] < NCOL), other=0.0).to(ACC)


@triton.jit
def _normalize(x, HEAD_D: tl.constexpr, ACC: tl.constexpr):
    """Shared-QK keys: x * rsqrt(mean(x^2) + 1e-6) / sqrt(D); padded columns are 0 and stay 0."""
    ms = tl.sum(x * x, 1) / HEAD_D
    r = 1.0 / tl.sqrt(ms + tl.full(ms.shape, _NORM_EPS, ACC))
    return x * r[:, None] / tl.sqrt(tl.full([1, 1], HEAD_D, ACC))


@triton.jit
def _key_ok(KPM, stride_kpm_l, pk, L, HAS_KPM: tl.constexpr):
    """Keys that may be seen: a real slot of the chunk (pk < L; past the chunk pk reads as L) and not
    padding. KPM at batch b."""
    ok = pk < L
    if HAS_KPM:
        pad = tl.load(KPM + pk.to(tl.int64) * stride_kpm_l, mask=ok, other=1)
        ok = ok & (pad == 0)
    return ok


@triton.jit
def _mask_logits(s, pq, pk, key_ok, CAUSAL: tl.constexpr, KEYS_ROWS: tl.constexpr):
    """Applies the hidden (-1e9) and self (-1e5) values to logits s: (queries, keys), or (keys, queries)
    when KEYS_ROWS. Returns the masked logits and the self-entry mask."""
    if KEYS_ROWS:
        kp = pk[:, None]
        qp = pq[None, :]
        hidden = key_ok[:, None] == 0
    else:
        kp = pk[None, :]
        qp = pq[:, None]
        hidden = key_ok[None, :] == 0
    if CAUSAL:
        hidden = hidden | (kp > qp)
    is_self = kp == qp
    s = tl.where(hidden, _MASK_VALUE, s)
    s = tl.where(is_self, _SELF_VALUE, s)
    return s, is_self


@triton.jit
def _wrap(c, T):
    """c mod T in [0, T) for any sign of c (Triton's % keeps the dividend's sign)."""
    m = c % T
    return tl.where(m < 0, m + T, m)


# --------------------------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _fwd_kernel(
    QK, V, Perm, KPM, OR, MR, LR,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_ph, stride_pr, stride_pl,
    stride_kpm_b, stride_kpm_l,
    stride_ob, stride_oh, stride_or, stride_on, stride_od,
    stride_mb, stride_mh, stride_mr, stride_mn,
    H, L, Lp, T, C, NB, NA, NH, scale_hi, scale_lo,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_C: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, LOG_L: tl.constexpr,
    ACC: tl.constexpr, DOT_PREC: tl.constexpr, OPD: tl.constexpr,
):
    """Forward of one query chunk of one (b, h), for its round r.

    Grid: (T * B * H,), 1-D; the chunk is the fast index.
    Tiles: the chunk's queries q = qk[pq] (BLOCK_C, BLOCK_D) in registers; for each window offset
    o = -NB .. NA, the key chunk (t + o) mod T: pk, k = normalize(qk[pk]) (BLOCK_C, BLOCK_D) and v[pk]
    (BLOCK_C, BLOCK_DV), gathered; online softmax across the offsets.
    Masks: rows and columns past C (loads, and pq = -1 / pk = L there); pk >= L and padding keys on
    loads and in the logits (-1e9); causal pk > pq (-1e9); self pk == pq (-1e5). Stores only rows with
    i < C and pq < L, at (b, h, r, pq) of OR (o_r, cast to OR's type), MR (m_r) and LR (l_r, or
    log(l_r) when LOG_L: with one round these are the final out, lse_max, lse_log).
    """
    pid = tl.program_id(0)
    t = pid % T
    bh = pid // T
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    QKb = QK + b * stride_qb + h * stride_qh
    Vb = V + b * stride_vb + h * stride_vh
    Pb = Perm + b * stride_pb + h * stride_ph
    KPMb = KPM + b * stride_kpm_b

    pq, r = _chunk_positions(Pb, stride_pr, stride_pl, t, Lp, C, offs_c, -1)
    q_ok = (offs_c < C) & (pq < L) & (pq >= 0)
    q = _gather_rows(QKb, stride_qn, stride_qd, pq, q_ok, offs_d, HEAD_D, OPD)
    # The scale arrives as two float32 halves so that float64 keeps it to ~1e-15.
    qk_scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)

    acc = tl.zeros([BLOCK_C, BLOCK_DV], dtype=ACC)
    l_i = tl.zeros([BLOCK_C], dtype=ACC)
    m_i = tl.full([BLOCK_C], _NEG_INF, dtype=ACC)
    for o in range(-NB, NA + 1):
        kc = _wrap(t + o, T)
        pk, _r = _chunk_positions(Pb, stride_pr, stride_pl, kc, Lp, C, offs_c, L)
        key_ok = _key_ok(KPMb, stride_kpm_l, pk, L, HAS_KPM)
        load_ok = pk < L  # padding keys are loaded: their self entry is seen
        k = _normalize(_gather_rows(QKb, stride_qn, stride_qd, pk, load_ok, offs_d, HEAD_D, ACC), HEAD_D, ACC).to(OPD)
        v = _gather_rows(Vb, stride_vn, stride_vd, pk, load_ok, offs_dv, HEAD_DV, OPD)
        s = _dot(q, tl.trans(k), DOT_PREC) * qk_scale
        s, _self = _mask_logits(s, pq, pk, key_ok, CAUSAL, False)
        # Every entry is finite (>= -1e9), so m_new is finite and no NaN can arise. A tile before the
        # row's self entry may see only hidden keys (m = -1e9); the self entry's -1e5 later rescales
        # them by exp(-1e9 + 1e5) = 0 exactly.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(OPD), v, DOT_PREC)
        m_i = m_new

    out = acc / l_i[:, None]
    pq64 = tl.where(q_ok, pq, 0).to(tl.int64)
    ORb = OR + b * stride_ob + h * stride_oh + r.to(tl.int64) * stride_or
    tl.store(ORb + pq64[:, None] * stride_on + offs_dv[None, :] * stride_od,
             out.to(OR.dtype.element_ty), mask=q_ok[:, None] & (offs_dv[None, :] < HEAD_DV))
    m_off = b * stride_mb + h * stride_mh + r.to(tl.int64) * stride_mr + pq64 * stride_mn
    tl.store(MR + m_off, m_i, mask=q_ok)
    if LOG_L:
        tl.store(LR + m_off, tl.log(l_i), mask=q_ok)
    else:
        tl.store(LR + m_off, l_i, mask=q_ok)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _combine_kernel(
    OR, MR, LR, Out, LseMax, LseLog,
    stride_ob, stride_oh, stride_or, stride_on, stride_od,
    stride_mb, stride_mh, stride_mr, stride_mn,
    stride_outb, stride_outh, stride_outn, stride_outd,
    stride_lb, stride_lh, stride_ln,
    H, L, NH,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr,
):
    """Combines the rounds of BLOCK_L positions of one (b, h).

    Grid: (cdiv(L, BLOCK_L) * B * H,), 1-D; the position tile is the fast index.
    Tiles: per round, m_r and l_r (BLOCK_L,) and o_r (BLOCK_L, BLOCK_DV); two passes over the rounds
    (the maximum, then the weighted sum). Masks: positions past L and columns past Dv.
    """
    pid = tl.program_id(0)
    n_l = tl.cdiv(L, BLOCK_L)
    tile = pid % n_l
    bh = pid // n_l
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_l = tile * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = offs_l < L
    ok_dv = ok[:, None] & (offs_dv[None, :] < HEAD_DV)
    offs_l64 = offs_l.to(tl.int64)
    m_ptrs = MR + b * stride_mb + h * stride_mh + offs_l64 * stride_mn
    l_ptrs = LR + b * stride_mb + h * stride_mh + offs_l64 * stride_mn
    o_ptrs = OR + b * stride_ob + h * stride_oh + offs_l64[:, None] * stride_on + offs_dv[None, :] * stride_od

    m_max = tl.full([BLOCK_L], _NEG_INF, dtype=ACC)
    for r in range(NH):
        m_max = tl.maximum(m_max, tl.load(m_ptrs + r * stride_mr, mask=ok, other=0.0))
    den = tl.zeros([BLOCK_L], dtype=ACC)
    acc = tl.zeros([BLOCK_L, BLOCK_DV], dtype=ACC)
    for r in range(NH):
        m_r = tl.load(m_ptrs + r * stride_mr, mask=ok, other=0.0)
        l_r = tl.load(l_ptrs + r * stride_mr, mask=ok, other=1.0)
        o_r = tl.load(o_ptrs + r * stride_or, mask=ok_dv, other=0.0)
        w = tl.exp(m_r - m_max) * l_r
        den += w
        acc += w[:, None] * o_r

    out = acc / den[:, None]
    tl.store(Out + b * stride_outb + h * stride_outh + offs_l64[:, None] * stride_outn + offs_dv[None, :] * stride_outd,
             out.to(Out.dtype.element_ty), mask=ok_dv)
    lse_off = b * stride_lb + h * stride_lh + offs_l64 * stride_ln
    tl.store(LseMax + lse_off, m_max, mask=ok)
    tl.store(LseLog + lse_off, tl.log(den), mask=ok)


# --------------------------------------------------------------------------------------------
# Backward.
# --------------------------------------------------------------------------------------------
@triton.jit
def _query_side(QKb, DOb, LMb, LLb, DLb, stride_qn, stride_qd, stride_don, stride_dod, stride_lmn,
                stride_lln, stride_dln, pq, q_ok, offs_d, offs_dv,
                HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, ACC: tl.constexpr, OPD: tl.constexpr):
    """q, dout (as the products' operands, OPD), lse_max, lse_log, delta of a query chunk. Rows that are not
    real read dout = 0, lse_max = +inf (so P = 0), lse_log = delta = 0."""
    q = _gather_rows(QKb, stride_qn, stride_qd, pq, q_ok, offs_d, HEAD_D, OPD)
    do = _gather_rows(DOb, stride_don, stride_dod, pq, q_ok, offs_dv, HEAD_DV, OPD)
    pq64 = pq.to(tl.int64)
    lm = tl.load(LMb + pq64 * stride_lmn, mask=q_ok, other=_POS_INF).to(ACC)
    ll = tl.load(LLb + pq64 * stride_lln, mask=q_ok, other=0.0).to(ACC)
    delta = tl.load(DLb + pq64 * stride_dln, mask=q_ok, other=0.0).to(ACC)
    return q, do, lm, ll, delta


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _dkdv_kernel(
    QK, V, Perm, KPM, DO, LseMax, LseLog, Delta, DKR, DVR,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_ph, stride_pr, stride_pl,
    stride_kpm_b, stride_kpm_l,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lmb, stride_lmh, stride_lmn,
    stride_llb, stride_llh, stride_lln,
    stride_dlb, stride_dlh, stride_dln,
    stride_dkb, stride_dkh, stride_dkr, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvr, stride_dvn, stride_dvd,
    H, L, Lp, T, C, NB, NA, NH, scale_hi, scale_lo,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_C: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    ACC: tl.constexpr, DOT_PREC: tl.constexpr, OPD: tl.constexpr,
):
    """Backward, keys' side: dk (w.r.t. the normalised keys) and dv of one key chunk of one (b, h).

    Grid: (T * B * H,), 1-D; the chunk is the fast index.
    Tiles: the chunk's keys pk, k = normalize(qk[pk]) (BLOCK_C, BLOCK_D), v[pk] (BLOCK_C, BLOCK_DV), dk,
    dv in registers; for each window offset o = -NB .. NA, the query chunk (c - o) mod T that sees this
    chunk at offset o (once per offset): q = qk[pq], dout[pq], lse_max, lse_log, delta, gathered.
    Transposed scores (keys x queries); P = exp((s - lse_max) - lse_log), recomputed.
    Masks: as the forward; dS = 0 on the self entry (constant logit); query rows that are not real have
    P = 0 (lse_max = +inf). Stores rows with j < C and pk < L (padding keys too: their self entry can
    carry P), at (b, h, rk, pk) of DKR, DVR (rk: this chunk's round).
    """
    pid = tl.program_id(0)
    c = pid % T
    bh = pid // T
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    QKb = QK + b * stride_qb + h * stride_qh
    Vb = V + b * stride_vb + h * stride_vh
    Pb = Perm + b * stride_pb + h * stride_ph
    KPMb = KPM + b * stride_kpm_b
    DOb = DO + b * stride_dob + h * stride_doh
    LMb = LseMax + b * stride_lmb + h * stride_lmh
    LLb = LseLog + b * stride_llb + h * stride_llh
    DLb = Delta + b * stride_dlb + h * stride_dlh

    pk, rk = _chunk_positions(Pb, stride_pr, stride_pl, c, Lp, C, offs_c, L)
    key_ok = _key_ok(KPMb, stride_kpm_l, pk, L, HAS_KPM)
    load_ok = pk < L
    k = _normalize(_gather_rows(QKb, stride_qn, stride_qd, pk, load_ok, offs_d, HEAD_D, ACC), HEAD_D, ACC).to(OPD)
    v = _gather_rows(Vb, stride_vn, stride_vd, pk, load_ok, offs_dv, HEAD_DV, OPD)
    qk_scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)

    dk = tl.zeros([BLOCK_C, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_C, BLOCK_DV], dtype=ACC)
    for o in range(-NB, NA + 1):
        qc = _wrap(c - o, T)
        pq, _r = _chunk_positions(Pb, stride_pr, stride_pl, qc, Lp, C, offs_c, -1)
        q_ok = (offs_c < C) & (pq < L) & (pq >= 0)
        q, do, lm, ll, delta = _query_side(QKb, DOb, LMb, LLb, DLb, stride_qn, stride_qd, stride_don,
                                           stride_dod, stride_lmn, stride_lln, stride_dln, pq, q_ok,
                                           offs_d, offs_dv, HEAD_D, HEAD_DV, ACC, OPD)
        s_t = _dot(k, tl.trans(q), DOT_PREC) * qk_scale
        s_t, is_self = _mask_logits(s_t, pq, pk, key_ok, CAUSAL, True)
        # lse_max first: exact for rows whose logits sit near -1e5.
        p_t = tl.exp((s_t - lm[None, :]) - ll[None, :])
        p_t = tl.where(p_t > 1.0, 1.0, p_t)  # at most 1 (rounding of the saved statistics); NaN stays NaN
        dv += _dot(p_t.to(OPD), do, DOT_PREC)
        dp_t = _dot(v, tl.trans(do), DOT_PREC)
        ds_t = tl.where(is_self, 0.0, p_t * (dp_t - delta[None, :]))
        dk += _dot(ds_t.to(OPD), q, DOT_PREC)

    dk = dk * qk_scale
    store_ok = (offs_c < C) & load_ok
    pk64 = tl.where(store_ok, pk, 0).to(tl.int64)
    rk64 = rk.to(tl.int64)
    tl.store(DKR + b * stride_dkb + h * stride_dkh + rk64 * stride_dkr + pk64[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(DKR.dtype.element_ty),
             mask=store_ok[:, None] & (offs_d[None, :] < HEAD_D))
    tl.store(DVR + b * stride_dvb + h * stride_dvh + rk64 * stride_dvr + pk64[:, None] * stride_dvn
             + offs_dv[None, :] * stride_dvd, dv.to(DVR.dtype.element_ty),
             mask=store_ok[:, None] & (offs_dv[None, :] < HEAD_DV))


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _dq_kernel(
    QK, V, Perm, KPM, DO, LseMax, LseLog, Delta, DQR,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_ph, stride_pr, stride_pl,
    stride_kpm_b, stride_kpm_l,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lmb, stride_lmh, stride_lmn,
    stride_llb, stride_llh, stride_lln,
    stride_dlb, stride_dlh, stride_dln,
    stride_dqb, stride_dqh, stride_dqr, stride_dqn, stride_dqd,
    H, L, Lp, T, C, NB, NA, NH, scale_hi, scale_lo,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_C: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    ACC: tl.constexpr, DOT_PREC: tl.constexpr, OPD: tl.constexpr,
):
    """Backward, queries' side: dq (through qk as queries) of one query chunk of one (b, h).

    Grid: (T * B * H,), 1-D, as the forward.
    Tiles: q = qk[pq] (BLOCK_C, BLOCK_D), dout[pq] (BLOCK_C, BLOCK_DV), lse_max, lse_log, delta and dq
    in registers; the window's key chunks streamed as in the forward, P recomputed.
    Masks: as the forward; dS = 0 on the self entry. Stores rows with i < C and pq < L at (b, h, r, pq)
    of DQR.
    """
    pid = tl.program_id(0)
    t = pid % T
    bh = pid // T
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    QKb = QK + b * stride_qb + h * stride_qh
    Vb = V + b * stride_vb + h * stride_vh
    Pb = Perm + b * stride_pb + h * stride_ph
    KPMb = KPM + b * stride_kpm_b

    pq, r = _chunk_positions(Pb, stride_pr, stride_pl, t, Lp, C, offs_c, -1)
    q_ok = (offs_c < C) & (pq < L) & (pq >= 0)
    q, do, lm, ll, delta = _query_side(QKb, DO + b * stride_dob + h * stride_doh,
                                       LseMax + b * stride_lmb + h * stride_lmh,
                                       LseLog + b * stride_llb + h * stride_llh,
                                       Delta + b * stride_dlb + h * stride_dlh,
                                       stride_qn, stride_qd, stride_don, stride_dod, stride_lmn,
                                       stride_lln, stride_dln, pq, q_ok, offs_d, offs_dv,
                                       HEAD_D, HEAD_DV, ACC, OPD)
    qk_scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)

    dq = tl.zeros([BLOCK_C, BLOCK_D], dtype=ACC)
    for o in range(-NB, NA + 1):
        kc = _wrap(t + o, T)
        pk, _r = _chunk_positions(Pb, stride_pr, stride_pl, kc, Lp, C, offs_c, L)
        key_ok = _key_ok(KPMb, stride_kpm_l, pk, L, HAS_KPM)
        load_ok = pk < L
        k = _normalize(_gather_rows(QKb, stride_qn, stride_qd, pk, load_ok, offs_d, HEAD_D, ACC), HEAD_D, ACC).to(OPD)
        v = _gather_rows(Vb, stride_vn, stride_vd, pk, load_ok, offs_dv, HEAD_DV, OPD)
        s = _dot(q, tl.trans(k), DOT_PREC) * qk_scale
        s, is_self = _mask_logits(s, pq, pk, key_ok, CAUSAL, False)
        p = tl.exp((s - lm[:, None]) - ll[:, None])
        p = tl.where(p > 1.0, 1.0, p)  # as in _dkdv_kernel
        dp = _dot(do, tl.trans(v), DOT_PREC)
        ds = tl.where(is_self, 0.0, p * (dp - delta[:, None]))
        dq += _dot(ds.to(OPD), k, DOT_PREC)

    dq = dq * qk_scale
    pq64 = tl.where(q_ok, pq, 0).to(tl.int64)
    tl.store(DQR + b * stride_dqb + h * stride_dqh + r.to(tl.int64) * stride_dqr + pq64[:, None] * stride_dqn
             + offs_d[None, :] * stride_dqd, dq.to(DQR.dtype.element_ty),
             mask=q_ok[:, None] & (offs_d[None, :] < HEAD_D))


# --------------------------------------------------------------------------------------------
# Configurations. The tiles are fixed by the problem (BLOCK_C by the chunk size, BLOCK_D / BLOCK_DV by
# the head dims); on GPU only warps and pipeline stages are tuned, per head dims, chunk tile and mask
# kind. Every kernel only writes its outputs (no accumulation into them), so the autotuner's repeated
# runs are harmless. Under the interpreter the kernels run once, untuned.
# --------------------------------------------------------------------------------------------
_TUNE_KEY = ["HEAD_D", "HEAD_DV", "BLOCK_C", "CAUSAL", "HAS_KPM"]
_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 1), (4, 2), (8, 1), (8, 2), (2, 1))]

_TUNED = {} if _INTERPRET else {
    name: triton.autotune(_CONFIGS, key=_TUNE_KEY)(kernel)
    for name, kernel in (("fwd", _fwd_kernel), ("dkdv", _dkdv_kernel), ("dq", _dq_kernel))
}


def _launch(kernel, name, grid, args, meta):
    if _INTERPRET:
        kernel[grid](*args, **meta)
    elif not autotune_enabled():
        launch_first_fitting(kernel, grid, args, meta, _CONFIGS)
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


# The dot products' operand type per input dtype (else the compute type ACC).
_OPERAND_TYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _compute_dtype(v: torch.Tensor) -> torch.dtype:
    return torch.float64 if v.dtype == torch.float64 else torch.float32


def _common(qk, v, perm, key_padding_mask, chunk_size, n_chunks_before, n_chunks_after, causal, scale):
    """Kernel arguments shared by the three attention kernels: (leading tensors, strides, ints, meta)."""
    B, H, L, D = qk.shape
    Dv = v.shape[-1]
    NH, Lp = perm.shape[2], perm.shape[3]
    C = int(chunk_size)
    T = NH * Lp // C
    f64 = _compute_dtype(v) == torch.float64
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8)  # same bytes, no copy
        kpm_strides = kpm.stride()
    else:
        kpm, kpm_strides = perm, (0, 0)  # never read
    meta = dict(
        HEAD_D=D, HEAD_DV=Dv,
        # tl.dot needs every dimension >= 16.
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
        BLOCK_C=max(16, triton.next_power_of_2(C)),
        CAUSAL=bool(causal), HAS_KPM=key_padding_mask is not None,
        ACC=tl.float64 if f64 else tl.float32,
        # float32: IEEE products unless torch allows TF32; bfloat16/float16 multiply as stored, float32 accumulation
        DOT_PREC=dot_precision(qk.dtype),
        OPD=_OPERAND_TYPES.get(qk.dtype, tl.float64 if f64 else tl.float32),
    )
    tensors = (qk, v, perm, kpm)
    strides = (*qk.stride(), *v.stride(), *perm.stride(), *kpm_strides)
    ints = (H, L, Lp, T, C, int(n_chunks_before), int(n_chunks_after), NH, *_f32_halves(float(scale)))
    return tensors, strides, ints, meta, T


def lsh_attention_fwd(qk, v, perm, key_padding_mask, chunk_size: int, n_chunks_before: int,
                      n_chunks_after: int, causal: bool, scale: float):
    """(out (B, H, L, Dv) in v's dtype, lse_max, lse_log (B, H, L) in the compute dtype).

    lse = lse_max + lse_log is the log-sum-exp over all rounds' windows; kept as two parts.
    """
    B, H, L, D = qk.shape
    Dv = v.shape[-1]
    NH = perm.shape[2]
    cdt = _compute_dtype(v)
    dev = qk.device
    out = torch.empty((B, H, L, Dv), dtype=v.dtype, device=dev)
    lse_max = torch.empty((B, H, L), dtype=cdt, device=dev)
    lse_log = torch.empty((B, H, L), dtype=cdt, device=dev)
    if B * H * L == 0 or NH == 0:
        return out.zero_(), lse_max.fill_(float("-inf")), lse_log.zero_()
    tensors, strides, ints, meta, T = _common(qk, v, perm, key_padding_mask, chunk_size, n_chunks_before,
                                              n_chunks_after, causal, scale)
    if NH == 1:  # one round: its (o, m, log l) are the results, written in place
        o_r, m_r, l_r = out.unsqueeze(2), lse_max.unsqueeze(2), lse_log.unsqueeze(2)
    else:
        o_r = torch.empty((B, H, NH, L, Dv), dtype=cdt, device=dev)
        m_r = torch.empty((B, H, NH, L), dtype=cdt, device=dev)
        l_r = torch.empty((B, H, NH, L), dtype=cdt, device=dev)
    args = (*tensors, o_r, m_r, l_r, *strides, *o_r.stride(), *m_r.stride(), *ints)
    _launch(_fwd_kernel, "fwd", (T * B * H,), args, dict(meta, LOG_L=NH == 1))
    if NH > 1:
        block_l = INTERPRETER_BLOCK_L if _INTERPRET else GPU_BLOCK_L
        _combine_kernel[(triton.cdiv(L, block_l) * B * H,)](
            o_r, m_r, l_r, out, lse_max, lse_log,
            *o_r.stride(), *m_r.stride(), *out.stride(), *lse_max.stride(), H, L, NH,
            HEAD_DV=Dv, BLOCK_DV=meta["BLOCK_DV"], BLOCK_L=block_l, ACC=meta["ACC"], **LAUNCH_OPTIONS)
    return out, lse_max, lse_log


def lsh_attention_bwd(dout, qk, v, perm, key_padding_mask, lse_max, lse_log, delta, chunk_size: int,
                      n_chunks_before: int, n_chunks_after: int, causal: bool, scale: float):
    """(dq (B, H, L, D), dk (B, H, L, D), dv (B, H, L, Dv)), contiguous, in the compute dtype, summed over
    rounds. dq: through qk as queries; dk: w.r.t. the normalised keys (the chain through the
    normalisation is the caller's); delta = rowsum(dout * out) - dlse."""
    B, H, L, D = qk.shape
    Dv = v.shape[-1]
    NH = perm.shape[2]
    cdt = _compute_dtype(v)
    dev = qk.device
    if B * H * L == 0 or NH == 0:
        return (torch.zeros((B, H, L, D), dtype=cdt, device=dev), torch.zeros((B, H, L, D), dtype=cdt, device=dev),
                torch.zeros((B, H, L, Dv), dtype=cdt, device=dev))
    tensors, strides, ints, meta, T = _common(qk, v, perm, key_padding_mask, chunk_size, n_chunks_before,
                                              n_chunks_after, causal, scale)
    # Per round at the original positions; every (round, position < L) is written exactly once.
    dq_r = torch.empty((B, H, NH, L, D), dtype=cdt, device=dev)
    dk_r = torch.empty((B, H, NH, L, D), dtype=cdt, device=dev)
    dv_r = torch.empty((B, H, NH, L, Dv), dtype=cdt, device=dev)
    back = (dout, lse_max, lse_log, delta)
    back_strides = (*dout.stride(), *lse_max.stride(), *lse_log.stride(), *delta.stride())
    grid = (T * B * H,)
    _launch(_dkdv_kernel, "dkdv", grid,
            (*tensors, *back, dk_r, dv_r, *strides, *back_strides, *dk_r.stride(), *dv_r.stride(), *ints), meta)
    _launch(_dq_kernel, "dq", grid,
            (*tensors, *back, dq_r, *strides, *back_strides, *dq_r.stride(), *ints), meta)
    if NH == 1:  # (B, H, 1, L, d) -> (B, H, L, d): still contiguous, no copy
        return dq_r.squeeze(2), dk_r.squeeze(2), dv_r.squeeze(2)
    return dq_r.sum(2), dk_r.sum(2), dv_r.sum(2)
