"""Transformer-XL's relative attention layer as the original code formulates it (Dai et al. 2019,
mem_transformer.py's RelPartialLearnableMultiHeadAttn): sequence-first tensors, the content and position
scores as two einsums over the whole (qlen, klen) grid, the position scores aligned by the pad-and-reshape
shift, the masked softmax, written out here (our own transcription) to test RelativeMemoryAttention and to
time the unfused formulation against the fused kernels."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """(qlen, rlen, ...) scores against descending distances -> entry (i, j) at distance (klen - qlen) + i - j:
    prepend a zero column, read the buffer as (rlen + 1, qlen, ...), drop the first row."""
    pad = x.new_zeros(x.shape[0], 1, *x.shape[2:])
    padded = torch.cat([pad, x], dim=1).view(x.shape[1] + 1, x.shape[0], *x.shape[2:])
    return padded[1:].view_as(x)


def sinusoid(pos_seq: torch.Tensor, dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0.0, dim, 2.0, dtype=torch.float64) / dim))
    s = torch.outer(pos_seq.to(torch.float64), inv_freq)
    return torch.cat([s.sin(), s.cos()], dim=-1)


def txl_layer(w, mems, qkv_w, r_w, o_w, r_w_bias, r_r_bias, ln, n_head, d_head, *, pre_lnorm=False,
              same_length=False, mem_len=0, clamp_len=None):
    """w (qlen, bsz, d_model), mems (mlen, bsz, d_model) or None; weights as nn.Linear's (out, in)."""
    qlen, bsz, _ = w.shape
    cat = w if mems is None else torch.cat([mems, w], 0)
    mlen = cat.shape[0] - qlen
    klen = cat.shape[0]
    heads = F.linear(ln(cat) if pre_lnorm else cat, qkv_w)
    q, k, v = torch.chunk(heads, 3, dim=-1)
    q = q[-qlen:].view(qlen, bsz, n_head, d_head)
    k = k.view(klen, bsz, n_head, d_head)
    v = v.view(klen, bsz, n_head, d_head)
    pos_seq = torch.arange(klen - 1, -1, -1.0, dtype=torch.float64)
    if clamp_len is not None:
        pos_seq = pos_seq.clamp(max=clamp_len)
    r = F.linear(sinusoid(pos_seq, w.shape[-1]).to(w.dtype), r_w).view(klen, n_head, d_head)
    ac = torch.einsum("ibnd,jbnd->ijbn", q + r_w_bias, k)
    bd = rel_shift(torch.einsum("ibnd,jnd->ijbn", q + r_r_bias, r))
    score = (ac + bd) * (1.0 / d_head ** 0.5)
    ones = torch.ones(qlen, klen, dtype=torch.bool)
    mask = torch.triu(ones, diagonal=1 + mlen)
    if same_length:
        mask_len = klen - mem_len
        shift = qlen - mask_len if mask_len > 0 else qlen
        mask = mask | torch.tril(ones, diagonal=-shift)
    score = score.masked_fill(mask[:, :, None, None], float("-inf"))
    prob = torch.softmax(score, dim=1)
    vec = torch.einsum("ijbn,jbnd->ibnd", prob, v).reshape(qlen, bsz, n_head * d_head)
    out = F.linear(vec, o_w)
    return w + out if pre_lnorm else ln(w + out)
