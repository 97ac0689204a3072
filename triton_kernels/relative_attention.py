"""Triton kernels of Transformer-XL relative attention (docs/semantics.md §9).

The math is ``longkernels/reference/memory_attention.py`` with ``pos_emb``; the launchers take what the C++
ops ``memory_attention_rel_fwd/bwd`` take: ``qu = q + content_bias`` and ``qv = q + pos_bias`` formed outside,
keys as two ranges (memory at positions ``0 .. M-1``, the segment at ``M .. M+N-1``), query ``i`` at ``M + i``,
causal, an optional window. The logit of a (query, key) pair is
``scale * (<qu_i, k_j> + <qv_i, R[h, (M + i) - j]>)``.

The position term of a (query tile, key tile) never goes through an ``N x (M + N)`` matrix or the
pad-and-shift trick. The distances a tile covers form one band of ``BLOCK_M + BLOCK_N - 1`` consecutive
distances, so the tile computes ``band = qv_tile @ R[band]^T`` (one dot product, ``BLOCK_M x BLOCK_W`` with
``BLOCK_W`` the power of two above the band) and reads each pair's entry along its diagonal with
``tl.gather``: entry ``(a, b)`` of the tile (query row ``a``, key column ``b``) is column
``a + BLOCK_N - 1 - b`` of the band, the same index for every tile. The backward turns the tile's
``dS`` back into the band by the inverse gather (each band entry of a row has exactly one key column, or
none) and forms ``dqv += dband @ R[band]`` and ``dR[band] += dband^T @ qv``.

Three kernels, as ``memory_attention.py``'s: the forward and ``dq`` per (query tile, b, h), ``dk, dv`` per
(key tile, b, kv head) looping the GQA group's query heads. ``dq`` also accumulates ``dR``: one band per
visited tile, added with float32 (float64) atomics into a ``(H, P, D)`` buffer, since many query tiles share a
distance; the launcher scales it and casts it to ``pos_emb``'s dtype. That sum's order varies from run to run
on a GPU (to round-off); everything else is deterministic. Tiles no row sees are skipped, tiles every row sees
whole run without the elementwise mask (``memory_attention.py``'s tile ranges).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .memory_attention import (_INTERPRET, _LN2, _LOG2E, _NEG_INF, _POS_INF, _configs, _dot, _exp, _f32_halves,
                               _key_tiles, _load_rows, _prob, _query_tiles)
from .tuning import LAUNCH_OPTIONS, autotune_enabled, dot_precision, launch_first_fitting

# Tiles under the interpreter: (BLOCK_M, BLOCK_N) per kernel. Tests may change them.
INTERPRETER_BLOCKS = {"fwd": (16, 16), "dq": (16, 16), "dkdv": (16, 16)}

_RUNTIME_INTS = ["H", "HKV", "N", "M", "P", "window", "N_BUCKET", "M_BUCKET"]


@triton.jit
def _band(qv, Rh, stride_rp, stride_rd, dmin, P, offs_d, HEAD_D: tl.constexpr, BLOCK_W: tl.constexpr,
          DOT_PREC: tl.constexpr):
    """(qv @ R[dmin .. dmin + BLOCK_W)^T, those rows of R): distances outside [0, P) read as zero vectors
    (they are hidden pairs' or no pair's)."""
    d = dmin + tl.arange(0, BLOCK_W)
    ok = (d >= 0) & (d < P)
    r = tl.load(Rh + d.to(tl.int64)[:, None] * stride_rp + offs_d[None, :] * stride_rd,
                mask=ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
    return _dot(qv, tl.trans(r), DOT_PREC), r, d, ok


@triton.jit
def _visible(qpos, kpos, jl, L, window, HAS_WINDOW: tl.constexpr):
    """(queries x keys) pairs a masked tile keeps: in the range, causal, inside the window."""
    vis = (jl[None, :] < L) & (kpos[None, :] <= qpos[:, None])
    if HAS_WINDOW:
        vis = vis & (kpos[None, :] > qpos[:, None] - window)
    return vis


@triton.jit
def _query_tile(QU, QV, stride_qb, stride_qh, stride_qn, stride_qd, stride_pb, stride_ph, stride_pn, stride_pd, H, N,
                M, GROUP: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """The program's query tile (grid: cdiv(N, BLOCK_M) * B * H, the query tile fastest, last (heaviest) tiles
    first): (b, h, kv head, first row, row offsets, rows, which rows are real, their positions, row indices in
    64 bits, the qu and qv tiles)."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(N, BLOCK_M)
    tile = n_m - 1 - pid % n_m
    bh = pid // n_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    i0 = tile * BLOCK_M
    arange_m = tl.arange(0, BLOCK_M)
    offs_m = i0 + arange_m
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    rows = tl.cast(i0, tl.int64) + arange_m[:, None]
    qu = _load_rows(QU + b * stride_qb + h * stride_qh + rows * stride_qn + offs_d[None, :] * stride_qd,
                    row_ok, offs_d, HEAD_D, BLOCK_D, True)
    qv = _load_rows(QV + b * stride_pb + h * stride_ph + rows * stride_pn + offs_d[None, :] * stride_pd,
                    row_ok, offs_d, HEAD_D, BLOCK_D, True)
    return b, h, h // GROUP, i0, arange_m, offs_m, row_ok, M + offs_m, rows, qu, qv


# --------------------------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_stage(acc, l_i, m_i, qu, qv, K, V, Rh, stride_kn, stride_kd, stride_vn, stride_vd, stride_rp, stride_rd,
               t_lo, t_hi, rs, L, q_lo, qpos, qk_scale, window, P, diag,
               MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
               EXP2: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over key tiles [t_lo, t_hi) of one range; diag: each pair's column of the band."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    start = tl.cast(t_lo * BLOCK_N, tl.int64)
    k_ptrs = K + start * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + start * stride_vn + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    for t in range(t_lo, t_hi):
        jl = t * BLOCK_N + offs_n
        k = _load_rows(k_ptrs, jl < L, offs_d, HEAD_D, BLOCK_D, MASKED)
        band, _, _, _ = _band(qv, Rh, stride_rp, stride_rd, q_lo - (rs + t * BLOCK_N) - (BLOCK_N - 1), P, offs_d,
                              HEAD_D, BLOCK_W, DOT_PREC)
        s = (_dot(qu, tl.trans(k), DOT_PREC) + tl.gather(band, diag, 1)) * qk_scale
        if MASKED:
            s = tl.where(_visible(qpos, rs + jl, jl, L, window, HAS_WINDOW), s, _NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:  # a row may see nothing yet: subtract 0, not -inf (exp gives 0, not NaN)
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


@triton.jit
def _ranges(r, MK, MV, K, V, b, hkv, stride_mkb, stride_mkh, stride_mkn, stride_mkd, stride_mvb, stride_mvh,
            stride_mvn, stride_mvd, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn,
            stride_vd, N, M):
    """Range r's (start position, length, K, V at (b, kv head), their row and column strides)."""
    if r == 0:  # memory: positions [0, M)
        return (0, M, MK + b * stride_mkb + hkv * stride_mkh, MV + b * stride_mvb + hkv * stride_mvh,
                stride_mkn, stride_mkd, stride_mvn, stride_mvd)
    else:  # the segment: positions [M, M + N)
        return (M, N, K + b * stride_kb + hkv * stride_kh, V + b * stride_vb + hkv * stride_vh,
                stride_kn, stride_kd, stride_vn, stride_vd)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _fwd_kernel(
    QU, QV, K, V, MK, MV, R, Out, Lse,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_pb, stride_ph, stride_pn, stride_pd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mkb, stride_mkh, stride_mkn, stride_mkd,
    stride_mvb, stride_mvh, stride_mvn, stride_mvd,
    stride_rh, stride_rp, stride_rd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    H, HKV, N, M, P, window, scale_hi, scale_lo, N_BUCKET, M_BUCKET,
    GROUP: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, HAS_WINDOW: tl.constexpr, ACC: tl.constexpr, EXP2: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Forward: out and lse of one query tile of one (b, h). Grid: (cdiv(N, BLOCK_M) * B * H,), the query tile
    fastest, last (heaviest) tiles first. Tiles: qu, qv (BLOCK_M, BLOCK_D) in registers; K, V and the band of R
    (BLOCK_W, BLOCK_D) streamed; rows past N and head-dim padding masked on loads and stores."""
    b, h, hkv, i0, arange_m, offs_m, row_ok, qpos, rows, qu, qv = _query_tile(
        QU, QV, stride_qb, stride_qh, stride_qn, stride_qd, stride_pb, stride_ph, stride_pn, stride_pd, H, N, M,
        GROUP, HEAD_D, BLOCK_D, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    Rh = R + h * stride_rh
    # The band column of pair (a, b): a + BLOCK_N - 1 - b, the same in every tile.
    diag = arange_m[:, None] + (BLOCK_N - 1) - tl.arange(0, BLOCK_N)[None, :]
    qk_scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    m_i = tl.full([BLOCK_M], _NEG_INF, dtype=ACC)
    q_lo = M + i0
    q_hi = M + tl.minimum(i0 + BLOCK_M, N) - 1
    for r in tl.static_range(2):
        rs, L, Kr, Vr, skn, skd, svn, svd = _ranges(
            r, MK, MV, K, V, b, hkv, stride_mkb, stride_mkh, stride_mkn, stride_mkd, stride_mvb, stride_mvh,
            stride_mvn, stride_mvd, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn,
            stride_vd, N, M)
        t_lo, t_f0, t_f1, t_hi = _key_tiles(q_lo, q_hi, rs, L, window, True, HAS_WINDOW, BLOCK_N)
        acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, qu, qv, Kr, Vr, Rh, skn, skd, svn, svd, stride_rp, stride_rd,
                                   t_lo, t_f0, rs, L, q_lo, qpos, qk_scale, window, P, diag, True, HAS_WINDOW,
                                   HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, BLOCK_W, EXP2, DOT_PREC)
        acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, qu, qv, Kr, Vr, Rh, skn, skd, svn, svd, stride_rp, stride_rd,
                                   t_f0, t_f1, rs, L, q_lo, qpos, qk_scale, window, P, diag, False, HAS_WINDOW,
                                   HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, BLOCK_W, EXP2, DOT_PREC)
        acc, l_i, m_i = _fwd_stage(acc, l_i, m_i, qu, qv, Kr, Vr, Rh, skn, skd, svn, svd, stride_rp, stride_rd,
                                   t_f1, t_hi, rs, L, q_lo, qpos, qk_scale, window, P, diag, True, HAS_WINDOW,
                                   HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, BLOCK_W, EXP2, DOT_PREC)

    # Every real row sees at least itself (causal, window >= 1): l_i > 0 there; padding rows are not stored.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if EXP2:
        lse = (m_i + tl.log2(l_safe)) * _LN2
    else:
        lse = m_i + tl.log(l_safe)
    tl.store(Out + b * stride_ob + h * stride_oh + rows * stride_on + offs_dv[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DV))
    tl.store(Lse + b * stride_lb + h * stride_lh + offs_m * stride_ln, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Backward: dk, dv.
# --------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_stage(dk, dv, k, v, QU, QV, DO, Lse, Delta, Rh, stride_qn, stride_qd, stride_pn, stride_pd,
                stride_don, stride_dod, stride_ln, stride_dln, stride_rp, stride_rd, t_lo, t_hi, N, M, kpos, k_lo,
                window, P, qk_scale, diag_t,
                MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_W: tl.constexpr, EXP2: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulates dk, dv (rows: the key tile) over query tiles [t_lo, t_hi) of one query head."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for t in range(t_lo, t_hi):
        i = t * BLOCK_M + offs_m
        row_ok = i < N
        rows = tl.cast(t * BLOCK_M, tl.int64) + offs_m[:, None]
        qu = _load_rows(QU + rows * stride_qn + offs_d[None, :] * stride_qd, row_ok, offs_d, HEAD_D, BLOCK_D, True)
        qv = _load_rows(QV + rows * stride_pn + offs_d[None, :] * stride_pd, row_ok, offs_d, HEAD_D, BLOCK_D, True)
        do = _load_rows(DO + rows * stride_don + offs_dv[None, :] * stride_dod, row_ok, offs_dv, HEAD_DV, BLOCK_DV,
                        True)
        lse = tl.load(Lse + i * stride_ln, mask=row_ok, other=_POS_INF)  # +inf: padding rows' P is 0
        delta = tl.load(Delta + i * stride_dln, mask=row_ok, other=0.0)
        if EXP2:
            lse = lse * _LOG2E
        band, _, _, _ = _band(qv, Rh, stride_rp, stride_rd, (M + t * BLOCK_M) - k_lo - (BLOCK_N - 1), P, offs_d,
                              HEAD_D, BLOCK_W, DOT_PREC)
        # Transposed scores (keys x queries); the band's entry of pair (key b, query a) is band[a, diag_t[b, a]].
        s_t = (_dot(k, tl.trans(qu), DOT_PREC) + tl.gather(tl.trans(band), diag_t, 0)) * qk_scale
        p_t = _prob(s_t - lse[None, :], EXP2)
        dp_t = _dot(v, tl.trans(do), DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        if MASKED:  # exact zeros on hidden pairs, after the exp (a NaN row must not reach keys it does not see)
            qpos = M + i
            vis = row_ok[None, :] & (kpos[:, None] <= qpos[None, :])
            if HAS_WINDOW:
                vis = vis & (kpos[:, None] > qpos[None, :] - window)
            p_t = tl.where(vis, p_t, 0.0)
            ds_t = tl.where(vis, ds_t, 0.0)
        dv += _dot(p_t.to(do.dtype), do, DOT_PREC)
        dk += _dot(ds_t.to(qu.dtype), qu, DOT_PREC)
    return dk, dv


@triton.jit
def _dkdv_tile(K, V, DK, DV, stride_kn, stride_kd, stride_vn, stride_vd, stride_dkn, stride_dkd, stride_dvn,
               stride_dvd, QU, QV, DO, Lse, Delta, R,
               stride_qb, stride_qh, stride_qn, stride_qd, stride_pb, stride_ph, stride_pn, stride_pd,
               stride_dob, stride_doh, stride_don, stride_dod,
               stride_lb, stride_lh, stride_ln, stride_dlb, stride_dlh, stride_dln, stride_rh, stride_rp, stride_rd,
               b, hkv, j0, rs, L, N, M, P, window, qk_scale,
               GROUP: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr, HAS_WINDOW: tl.constexpr, ACC: tl.constexpr, EXP2: tl.constexpr,
               DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
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
    t_lo, t_f0, t_f1, t_hi = _query_tiles(k_lo, k_hi, M, N, window, True, HAS_WINDOW, BLOCK_M)
    diag_t = tl.arange(0, BLOCK_M)[None, :] + (BLOCK_N - 1) - arange_n[:, None]
    for g in range(GROUP):
        h = (hkv * GROUP + g).to(tl.int64)
        QUh = QU + b * stride_qb + h * stride_qh
        QVh = QV + b * stride_pb + h * stride_ph
        DOh = DO + b * stride_dob + h * stride_doh
        Lh = Lse + b * stride_lb + h * stride_lh
        DLh = Delta + b * stride_dlb + h * stride_dlh
        Rh = R + h * stride_rh
        dk, dv = _dkdv_stage(dk, dv, k, v, QUh, QVh, DOh, Lh, DLh, Rh, stride_qn, stride_qd, stride_pn, stride_pd,
                             stride_don, stride_dod, stride_ln, stride_dln, stride_rp, stride_rd, t_lo, t_f0, N, M,
                             kpos, k_lo, window, P, qk_scale, diag_t, True, HAS_WINDOW, HEAD_D, HEAD_DV, BLOCK_D,
                             BLOCK_DV, BLOCK_M, BLOCK_N, BLOCK_W, EXP2, DOT_PREC)
        dk, dv = _dkdv_stage(dk, dv, k, v, QUh, QVh, DOh, Lh, DLh, Rh, stride_qn, stride_qd, stride_pn, stride_pd,
                             stride_don, stride_dod, stride_ln, stride_dln, stride_rp, stride_rd, t_f0, t_f1, N, M,
                             kpos, k_lo, window, P, qk_scale, diag_t, False, HAS_WINDOW, HEAD_D, HEAD_DV, BLOCK_D,
                             BLOCK_DV, BLOCK_M, BLOCK_N, BLOCK_W, EXP2, DOT_PREC)
        dk, dv = _dkdv_stage(dk, dv, k, v, QUh, QVh, DOh, Lh, DLh, Rh, stride_qn, stride_qd, stride_pn, stride_pd,
                             stride_don, stride_dod, stride_ln, stride_dln, stride_rp, stride_rd, t_f1, t_hi, N, M,
                             kpos, k_lo, window, P, qk_scale, diag_t, True, HAS_WINDOW, HEAD_D, HEAD_DV, BLOCK_D,
                             BLOCK_DV, BLOCK_M, BLOCK_N, BLOCK_W, EXP2, DOT_PREC)
    if EXP2:  # the logits' scale in natural units (qk_scale carries log2(e))
        dk = dk * (qk_scale * _LN2)
    else:
        dk = dk * qk_scale
    tl.store(DK + start * stride_dkn + arange_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=key_ok[:, None] & (offs_d[None, :] < HEAD_D))
    tl.store(DV + start * stride_dvn + arange_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=key_ok[:, None] & (offs_dv[None, :] < HEAD_DV))


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _dkdv_kernel(
    QU, QV, K, V, MK, MV, R, DO, Lse, Delta, DK, DV, DMK, DMV,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_pb, stride_ph, stride_pn, stride_pd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mkb, stride_mkh, stride_mkn, stride_mkd,
    stride_mvb, stride_mvh, stride_mvn, stride_mvd,
    stride_rh, stride_rp, stride_rd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lb, stride_lh, stride_ln,
    stride_dlb, stride_dlh, stride_dln,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dmkb, stride_dmkh, stride_dmkn, stride_dmkd,
    stride_dmvb, stride_dmvh, stride_dmvn, stride_dmvd,
    H, HKV, N, M, P, window, scale_hi, scale_lo, N_BUCKET, M_BUCKET,
    GROUP: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, HAS_WINDOW: tl.constexpr, ACC: tl.constexpr, EXP2: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Backward, keys' side: dk, dv (or dmem_k, dmem_v) of one key tile of one (b, kv head). Grid:
    ((cdiv(M, BLOCK_N) + cdiv(N, BLOCK_N)) * B * HKV,), the key tile fastest; memory tiles first."""
    pid = tl.program_id(0)
    n_mem = tl.cdiv(M, BLOCK_N)
    n_t = n_mem + tl.cdiv(N, BLOCK_N)
    tile = pid % n_t
    bk = pid // n_t
    b = (bk // HKV).to(tl.int64)
    hkv = (bk % HKV).to(tl.int64)
    qk_scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    if tile < n_mem:
        _dkdv_tile(MK + b * stride_mkb + hkv * stride_mkh, MV + b * stride_mvb + hkv * stride_mvh,
                   DMK + b * stride_dmkb + hkv * stride_dmkh, DMV + b * stride_dmvb + hkv * stride_dmvh,
                   stride_mkn, stride_mkd, stride_mvn, stride_mvd, stride_dmkn, stride_dmkd, stride_dmvn, stride_dmvd,
                   QU, QV, DO, Lse, Delta, R, stride_qb, stride_qh, stride_qn, stride_qd, stride_pb, stride_ph,
                   stride_pn, stride_pd, stride_dob, stride_doh, stride_don, stride_dod, stride_lb, stride_lh,
                   stride_ln, stride_dlb, stride_dlh, stride_dln, stride_rh, stride_rp, stride_rd,
                   b, hkv, tile * BLOCK_N, 0, M, N, M, P, window, qk_scale, GROUP, HEAD_D, HEAD_DV, BLOCK_D,
                   BLOCK_DV, HAS_WINDOW, ACC, EXP2, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_W)
    else:
        _dkdv_tile(K + b * stride_kb + hkv * stride_kh, V + b * stride_vb + hkv * stride_vh,
                   DK + b * stride_dkb + hkv * stride_dkh, DV + b * stride_dvb + hkv * stride_dvh,
                   stride_kn, stride_kd, stride_vn, stride_vd, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
                   QU, QV, DO, Lse, Delta, R, stride_qb, stride_qh, stride_qn, stride_qd, stride_pb, stride_ph,
                   stride_pn, stride_pd, stride_dob, stride_doh, stride_don, stride_dod, stride_lb, stride_lh,
                   stride_ln, stride_dlb, stride_dlh, stride_dln, stride_rh, stride_rp, stride_rd,
                   b, hkv, (tile - n_mem) * BLOCK_N, M, N, N, M, P, window, qk_scale, GROUP, HEAD_D, HEAD_DV,
                   BLOCK_D, BLOCK_DV, HAS_WINDOW, ACC, EXP2, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_W)


# --------------------------------------------------------------------------------------------
# Backward: dqu, dqv and dR.
# --------------------------------------------------------------------------------------------
@triton.jit
def _dq_stage(dqu, dqv, qu, qv, do, lse, delta, K, V, Rh, DRh, stride_kn, stride_kd, stride_vn, stride_vd,
              stride_rp, stride_rd, stride_drp, t_lo, t_hi, rs, L, q_lo, qpos, qk_scale, window, P, diag, undiag,
              MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
              EXP2: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulates dqu, dqv (unscaled) over key tiles [t_lo, t_hi) of one range, and adds each tile's band of dR.
    undiag: the key column of each band entry of a row (outside [0, BLOCK_N): no key of this tile)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_tile = (undiag >= 0) & (undiag < BLOCK_N)
    undiag = tl.where(in_tile, undiag, 0)
    start = tl.cast(t_lo * BLOCK_N, tl.int64)
    k_ptrs = K + start * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + start * stride_vn + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    for t in range(t_lo, t_hi):
        jl = t * BLOCK_N + offs_n
        k = _load_rows(k_ptrs, jl < L, offs_d, HEAD_D, BLOCK_D, MASKED)
        v = _load_rows(v_ptrs, jl < L, offs_dv, HEAD_DV, BLOCK_DV, MASKED)
        band, r, d, d_ok = _band(qv, Rh, stride_rp, stride_rd, q_lo - (rs + t * BLOCK_N) - (BLOCK_N - 1), P, offs_d,
                                 HEAD_D, BLOCK_W, DOT_PREC)
        s = (_dot(qu, tl.trans(k), DOT_PREC) + tl.gather(band, diag, 1)) * qk_scale
        p = _prob(s - lse[:, None], EXP2)
        dp = _dot(do, tl.trans(v), DOT_PREC)
        ds = p * (dp - delta[:, None])
        if MASKED:
            ds = tl.where(_visible(qpos, rs + jl, jl, L, window, HAS_WINDOW), ds, 0.0)
        dqu += _dot(ds.to(k.dtype), k, DOT_PREC)
        dband = tl.where(in_tile, tl.gather(ds, undiag, 1), 0.0)  # (BLOCK_M, BLOCK_W): dS back on the band
        dqv += _dot(dband.to(r.dtype), r, DOT_PREC)
        dr = _dot(tl.trans(dband).to(qv.dtype), qv, DOT_PREC)  # (BLOCK_W, BLOCK_D)
        tl.atomic_add(DRh + d.to(tl.int64)[:, None] * stride_drp + offs_d[None, :], dr,
                      mask=d_ok[:, None] & (offs_d[None, :] < HEAD_D))
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dqu, dqv


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _dq_kernel(
    QU, QV, K, V, MK, MV, R, DO, Lse, Delta, DQU, DQV, DR,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_pb, stride_ph, stride_pn, stride_pd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mkb, stride_mkh, stride_mkn, stride_mkd,
    stride_mvb, stride_mvh, stride_mvn, stride_mvd,
    stride_rh, stride_rp, stride_rd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_lb, stride_lh, stride_ln,
    stride_dlb, stride_dlh, stride_dln,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_dpb, stride_dph, stride_dpn, stride_dpd,
    stride_drh, stride_drp,
    H, HKV, N, M, P, window, scale_hi, scale_lo, N_BUCKET, M_BUCKET,
    GROUP: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, HAS_WINDOW: tl.constexpr, ACC: tl.constexpr, EXP2: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Backward, queries' side: dqu, dqv of one query tile of one (b, h), and its share of dR (unscaled, atomic
    adds into DR, (H, P, D) contiguous in the accumulation dtype). Grid: as the forward."""
    b, h, hkv, i0, arange_m, offs_m, row_ok, qpos, rows, qu, qv = _query_tile(
        QU, QV, stride_qb, stride_qh, stride_qn, stride_qd, stride_pb, stride_ph, stride_pn, stride_pd, H, N, M,
        GROUP, HEAD_D, BLOCK_D, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    do = _load_rows(DO + b * stride_dob + h * stride_doh + rows * stride_don + offs_dv[None, :] * stride_dod,
                    row_ok, offs_dv, HEAD_DV, BLOCK_DV, True)
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + offs_m * stride_ln, mask=row_ok, other=_POS_INF)
    delta = tl.load(Delta + b * stride_dlb + h * stride_dlh + offs_m * stride_dln, mask=row_ok, other=0.0)
    if EXP2:
        lse = lse * _LOG2E
    qk_scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    diag = arange_m[:, None] + (BLOCK_N - 1) - tl.arange(0, BLOCK_N)[None, :]
    undiag = arange_m[:, None] + (BLOCK_N - 1) - tl.arange(0, BLOCK_W)[None, :]
    Rh = R + h * stride_rh
    DRh = DR + h * stride_drh

    dqu = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    dqv = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    q_lo = M + i0
    q_hi = M + tl.minimum(i0 + BLOCK_M, N) - 1
    for r in tl.static_range(2):
        rs, L, Kr, Vr, skn, skd, svn, svd = _ranges(
            r, MK, MV, K, V, b, hkv, stride_mkb, stride_mkh, stride_mkn, stride_mkd, stride_mvb, stride_mvh,
            stride_mvn, stride_mvd, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn,
            stride_vd, N, M)
        t_lo, t_f0, t_f1, t_hi = _key_tiles(q_lo, q_hi, rs, L, window, True, HAS_WINDOW, BLOCK_N)
        dqu, dqv = _dq_stage(dqu, dqv, qu, qv, do, lse, delta, Kr, Vr, Rh, DRh, skn, skd, svn, svd, stride_rp,
                             stride_rd, stride_drp, t_lo, t_f0, rs, L, q_lo, qpos, qk_scale, window, P, diag, undiag,
                             True, HAS_WINDOW, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, BLOCK_W, EXP2, DOT_PREC)
        dqu, dqv = _dq_stage(dqu, dqv, qu, qv, do, lse, delta, Kr, Vr, Rh, DRh, skn, skd, svn, svd, stride_rp,
                             stride_rd, stride_drp, t_f0, t_f1, rs, L, q_lo, qpos, qk_scale, window, P, diag, undiag,
                             False, HAS_WINDOW, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, BLOCK_W, EXP2, DOT_PREC)
        dqu, dqv = _dq_stage(dqu, dqv, qu, qv, do, lse, delta, Kr, Vr, Rh, DRh, skn, skd, svn, svd, stride_rp,
                             stride_rd, stride_drp, t_f1, t_hi, rs, L, q_lo, qpos, qk_scale, window, P, diag, undiag,
                             True, HAS_WINDOW, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, BLOCK_W, EXP2, DOT_PREC)
    if EXP2:
        sc = qk_scale * _LN2
    else:
        sc = qk_scale
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_D)
    tl.store(DQU + b * stride_dqb + h * stride_dqh + rows * stride_dqn + offs_d[None, :] * stride_dqd,
             (dqu * sc).to(DQU.dtype.element_ty), mask=mask)
    tl.store(DQV + b * stride_dpb + h * stride_dph + rows * stride_dpn + offs_d[None, :] * stride_dpd,
             (dqv * sc).to(DQV.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Configurations and launchers. The band makes a tile's working set BLOCK_M x BLOCK_W, BLOCK_W = 2 max(BLOCK_M,
# BLOCK_N): smaller tiles than plain memory attention's. First in each list the config the compile check
# (tests/triton_compile.py, bf16, sm_90) finds spilling least at D = 64 and 128: 8 warps (the band and its
# gather need the registers; at 4 warps every config but the 32 x 32 forward took 255 registers and spilled,
# up to 3 KB). The 4-warp configs stay for the autotuner to time (docs/decisions.md).
# --------------------------------------------------------------------------------------------
_TUNE_KEY = ["HEAD_D", "HEAD_DV", "GROUP", "HAS_WINDOW", "N_BUCKET", "M_BUCKET"]
_FWD_CONFIGS = _configs([(64, 64, 8, 2), (64, 32, 8, 2), (64, 64, 4, 2), (32, 32, 4, 2)])
_DQ_CONFIGS = _configs([(32, 32, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)])
_DKDV_CONFIGS = _configs([(32, 32, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2)])
_WIDTH = {"BLOCK_W": lambda args: 2 * max(args["BLOCK_M"], args["BLOCK_N"])}

_CONFIG_LISTS = {"fwd": _FWD_CONFIGS, "dq": _DQ_CONFIGS, "dkdv": _DKDV_CONFIGS}
_KERNELS = {"fwd": _fwd_kernel, "dq": _dq_kernel, "dkdv": _dkdv_kernel}
_TUNED = {} if _INTERPRET else {
    name: triton.autotune(configs, key=_TUNE_KEY)(triton.heuristics(_WIDTH)(_KERNELS[name]))
    for name, configs in _CONFIG_LISTS.items()
}


def _launch(kernel, name, grid, args, meta):
    if _INTERPRET:
        bm, bn = INTERPRETER_BLOCKS[name]
        kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_W=2 * max(bm, bn))
    elif not autotune_enabled():
        launch_first_fitting(kernel, grid, args, meta, _CONFIG_LISTS[name],
                             derived=lambda c: {"BLOCK_W": 2 * max(c["BLOCK_M"], c["BLOCK_N"])})
    else:
        _TUNED[name][grid](*args, **meta, **LAUNCH_OPTIONS)


def _meta(qu, v, k, window, scale):
    f64 = qu.dtype == torch.float64
    D, Dv = qu.shape[-1], v.shape[-1]
    meta = dict(GROUP=qu.shape[1] // k.shape[1], HEAD_D=D, HEAD_DV=Dv,
                BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
                HAS_WINDOW=window > 0, ACC=tl.float64 if f64 else tl.float32, EXP2=not f64,
                DOT_PREC=dot_precision(qu.dtype))
    scale_hi, scale_lo = _f32_halves(scale if f64 else scale * 1.4426950408889634)
    return meta, scale_hi, scale_lo


def _ints(qu, k, mem_k, pos_emb, window):
    """(H, HKV, N, M, P, window) as the kernels take them."""
    _, H, N, _ = qu.shape
    M = mem_k.shape[2]
    return (H, k.shape[1], N, M, pos_emb.shape[1], int(window))


def relative_fwd(qu, qv, k, v, mem_k, mem_v, pos_emb, window: int, scale: float):
    """(out (B, H, N, Dv) in q's dtype, lse (B, H, N) float32, float64 for float64 inputs)."""
    B, H, N, _ = qu.shape
    M = mem_k.shape[2]
    out = torch.empty((B, H, N, v.shape[-1]), dtype=qu.dtype, device=qu.device)
    lse = torch.empty((B, H, N), dtype=torch.float64 if qu.dtype == torch.float64 else torch.float32,
                      device=qu.device)
    if out.numel() == 0:
        return out, lse
    meta, scale_hi, scale_lo = _meta(qu, v, k, window, scale)
    args = (qu, qv, k, v, mem_k, mem_v, pos_emb, out, lse, *qu.stride(), *qv.stride(), *k.stride(), *v.stride(),
            *mem_k.stride(), *mem_v.stride(), *pos_emb.stride(), *out.stride(), *lse.stride(),
            *_ints(qu, k, mem_k, pos_emb, window), scale_hi, scale_lo, triton.next_power_of_2(N),
            triton.next_power_of_2(max(M, 1)))
    grid = lambda META: (triton.cdiv(N, META["BLOCK_M"]) * B * H,)  # noqa: E731
    _launch(_fwd_kernel, "fwd", grid, args, meta)
    return out, lse


def relative_bwd(dout, qu, qv, k, v, mem_k, mem_v, pos_emb, lse, delta, window: int, scale: float):
    """(dqu, dqv, dk, dv, dmem_k, dmem_v, dpos_emb), each in its input's dtype and layout."""
    B, H, N, _ = qu.shape
    Hkv, M = k.shape[1], mem_k.shape[2]
    grads = [torch.empty_like(t) for t in (qu, qv, k, v, mem_k, mem_v)]
    acc = torch.float64 if qu.dtype == torch.float64 else torch.float32
    dr = torch.zeros(pos_emb.shape, dtype=acc, device=qu.device)
    if grads[0].numel() == 0 or grads[3].numel() == 0:
        return (*(g.zero_() for g in grads), dr.to(pos_emb.dtype))
    dqu, dqv, dk, dv, dmk, dmv = grads
    meta, scale_hi, scale_lo = _meta(qu, v, k, window, scale)
    tail = (*_ints(qu, k, mem_k, pos_emb, window), scale_hi, scale_lo, triton.next_power_of_2(N),
            triton.next_power_of_2(max(M, 1)))
    common = (*qu.stride(), *qv.stride(), *k.stride(), *v.stride(), *mem_k.stride(), *mem_v.stride(),
              *pos_emb.stride(), *dout.stride(), *lse.stride(), *delta.stride())
    args = (qu, qv, k, v, mem_k, mem_v, pos_emb, dout, lse, delta, dk, dv, dmk, dmv, *common, *dk.stride(),
            *dv.stride(), *dmk.stride(), *dmv.stride(), *tail)
    grid = lambda META: ((triton.cdiv(M, META["BLOCK_N"]) + triton.cdiv(N, META["BLOCK_N"])) * B * Hkv,)  # noqa: E731
    _launch(_dkdv_kernel, "dkdv", grid, args, meta)
    args = (qu, qv, k, v, mem_k, mem_v, pos_emb, dout, lse, delta, dqu, dqv, dr, *common, *dqu.stride(),
            *dqv.stride(), dr.stride(0), dr.stride(1), *tail)
    grid = lambda META: (triton.cdiv(N, META["BLOCK_M"]) * B * H,)  # noqa: E731
    _launch(_dq_kernel, "dq", grid, args, meta)
    return dqu, dqv, dk, dv, dmk, dmv, dr.mul_(scale).to(pos_emb.dtype)
