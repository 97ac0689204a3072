"""Memory-segment causal attention, written as directly as the semantics allow.

This is the definition every fast path is tested against (docs/semantics.md §1):
materialised scores, plain softmax, no tiling. It is slow and uses O(N * (M + N))
memory on purpose: it must be obviously right, not fast.
"""
from __future__ import annotations

import torch


def visible_mask(n: int, m: int, *, causal: bool, window: int | None, device=None, q_offset=None) -> torch.Tensor:
    """Boolean (N, M + N) mask: True where query i may see key j.

    Query i sits at absolute position M + i (``q_offset + i`` when given), key j at position j (memory first).
    """
    qpos = torch.arange(n, device=device).unsqueeze(1) + (m if q_offset is None else q_offset)
    kpos = torch.arange(m + n, device=device).unsqueeze(0)
    mask = torch.ones(n, m + n, dtype=torch.bool, device=device)
    if causal:
        mask &= kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask


def visible_keys(n: int, m: int, *, causal: bool, window: int | None, key_padding_mask=None, document_ids=None,
                 device=None, q_offset=None) -> torch.Tensor:
    """Boolean (B or 1, N, M + N) mask: True where query i may see key j, with every mask applied."""
    vis = visible_mask(n, m, causal=causal, window=window, device=device, q_offset=q_offset).unsqueeze(0)
    if key_padding_mask is not None:
        vis = vis & ~key_padding_mask.unsqueeze(1)
    if document_ids is not None:
        vis = vis & (document_ids[:, m:].unsqueeze(2) == document_ids.unsqueeze(1))
    return vis


def memory_attention(q, k, v, mem_k=None, mem_v=None, *, causal=True, window=None, scale=None,
                     alibi_slopes=None, return_lse=False, key_padding_mask=None, document_ids=None, softcap=None,
                     sinks=None, q_offset=None, pos_emb=None, content_bias=None, pos_bias=None):
    """Reference of :func:`longkernels.memory_attention`; same arguments, same results.

    Computes in float32 (float64 for float64 inputs) and returns the input dtype. A row with no
    visible key gets output 0 and LSE -inf (the sink's logit with sinks), and no gradient.
    ``q_offset`` (default M) places query i at position ``q_offset + i`` (the keys stay at
    ``0 .. M + N - 1``): a ring step's block pair (docs/semantics.md §8).
    ``pos_emb`` ``(H, P, D)``, ``content_bias``/``pos_bias`` ``(H, D)``: Transformer-XL's relative logits
    (docs/semantics.md §9), ``scale * (<q_i + u, k_j> + <q_i + v, pos_emb[h, d_ij]>)``, ``d_ij = qpos_i - j``.
    """
    dtype = q.dtype
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    if mem_k is None:
        mem_k = k.new_zeros(B, Hkv, 0, k.shape[-1])
        mem_v = v.new_zeros(B, Hkv, 0, v.shape[-1])
    M = mem_k.shape[2]
    scale = D ** -0.5 if scale is None else scale

    keys = torch.cat([mem_k, k], dim=2).to(cdt)
    vals = torch.cat([mem_v, v], dim=2).to(cdt)
    group = H // Hkv
    keys = keys.repeat_interleave(group, dim=1)  # query head h reads kv head h // group
    vals = vals.repeat_interleave(group, dim=1)

    if pos_emb is None:
        s = torch.matmul(q.to(cdt), keys.transpose(-1, -2)) * scale  # (B, H, N, M + N)
    else:  # Transformer-XL: content (a)+(c) and position (b)+(d) terms, the position one gathered by distance
        qc = q.to(cdt) if content_bias is None else q.to(cdt) + content_bias.to(cdt).view(1, H, 1, -1)
        qp = q.to(cdt) if pos_bias is None else q.to(cdt) + pos_bias.to(cdt).view(1, H, 1, -1)
        pos_scores = torch.matmul(qp, pos_emb.to(cdt).transpose(-1, -2).unsqueeze(0))  # (B, H, N, P)
        qpos = torch.arange(N, device=q.device).unsqueeze(1) + (M if q_offset is None else q_offset)
        dist = (qpos - torch.arange(M + N, device=q.device).unsqueeze(0)).clamp(0, pos_emb.shape[1] - 1)
        s = (torch.matmul(qc, keys.transpose(-1, -2)) + pos_scores.gather(-1, dist.expand(B, H, N, M + N))) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        qpos = torch.arange(N, device=q.device).unsqueeze(1) + (M if q_offset is None else q_offset)
        kpos = torch.arange(M + N, device=q.device).unsqueeze(0)
        dist = (qpos - kpos).to(cdt)  # M + i - j
        s = s - alibi_slopes.to(cdt).view(1, H, 1, 1) * dist
    vis = visible_keys(N, M, causal=causal, window=window, key_padding_mask=key_padding_mask,
                       document_ids=document_ids, device=q.device, q_offset=q_offset).unsqueeze(1)  # (B | 1, 1, N, M + N)
    vis = vis.expand(B, H, N, M + N)
    if sinks is not None:  # one more logit per row, carrying no value
        s = torch.cat([s, sinks.to(cdt).view(1, H, 1, 1).expand(B, H, N, 1)], dim=-1)
        vis = torch.cat([vis, vis.new_ones(B, H, N, 1)], dim=-1)
    # Rows that see nothing are given finite logits for the softmax and zeroed after it, so that
    # neither the values nor the gradients pick up a NaN from exp(-inf - -inf).
    seen = vis.any(-1, keepdim=True)
    s = s.masked_fill(~vis, float("-inf")).masked_fill(~seen, 0.0)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).masked_fill(~seen, 0.0)  # hidden keys: exp(-inf) = 0 already
    lse = lse.masked_fill(~seen.squeeze(-1), float("-inf"))
    if sinks is not None:
        p = p[..., :-1]
    out = torch.matmul(p, vals).to(dtype)
    if return_lse:
        # float32 LSE, as FlashAttention returns it; float64 inputs keep float64 so that
        # float64 parity tests can hold the LSE to float64 round-off.
        return out, lse.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return out
