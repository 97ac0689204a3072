"""Reformer's LSH attention, written as directly as the semantics allow (docs/semantics.md §2).

The conventions are those of trax's ``LSHSelfAttention``, which HuggingFace ``transformers``
reproduces output for output; ``tests/test_lsh_attention_hf.py`` checks this file against it.
Every step is materialised (hash, argsort, gathered sorted copies, look-around by concatenation,
full chunk-by-window score blocks): it must be obviously right, not fast.

Steps:
1. pad the sequence to a multiple of ``chunk_size`` (padded tokens are padding: masked as keys,
   outputs dropped, hashed to the extra bucket);
2. hash every token once per round: ``argmax([x R_r ; -x R_r])`` in float32;
3. sort all rounds together by the unique key ``Lp * (r * n_buckets' + bucket) + position``;
4. cut the ``n_hashes * Lp`` sorted items into chunks; each query chunk attends to its own chunk and
   ``n_chunks_before`` / ``n_chunks_after`` neighbours, circularly over the concatenated rounds;
5. keys are the length-normalised queries; masks by original position: causal and padded keys get
   -1e9, the token itself -1e5 (replacing whatever it had);
6. per round: log-sum-exp and output at the original positions; rounds combine by log-sum-exp
   (each log-sum-exp kept as a max and a sum, see below).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

MASK_VALUE = -1e9  # causal and padded keys (trax / HF float32 value)
SELF_MASK_VALUE = -1e5  # the token itself: seen only when nothing else is
NORM_EPS = 1e-6


def default_n_buckets(seq_len: int, chunk_size: int) -> int:
    """Largest power of two <= 2 * L / chunk_size, at least 2 (Reformer's choice: ~chunk_size/2
    tokens per bucket, so a bucket usually fits in a chunk and its neighbour)."""
    target = (2 * seq_len) // chunk_size
    return max(2, 1 << (target.bit_length() - 1)) if target >= 2 else 2


def padded_length(seq_len: int, chunk_size: int) -> int:
    return -(-seq_len // chunk_size) * chunk_size


def bucket_factors(n_buckets) -> tuple[int, ...]:
    """``n_buckets`` as its factors: ``(n,)`` for an int, the list itself for a factorised count."""
    return (int(n_buckets),) if isinstance(n_buckets, int) else tuple(int(f) for f in n_buckets)


def total_buckets(n_buckets) -> int:
    """The number of buckets: ``n``, or the product of the factors ``[n1, n2, ...]``."""
    return math.prod(bucket_factors(n_buckets))


def rotation_columns(n_buckets) -> int:
    """Rotation columns per round: ``n / 2``, or ``sum(n_i) / 2`` for factors (one block per factor)."""
    return sum(bucket_factors(n_buckets)) // 2


def draw_rotations(num_heads: int, head_dim: int, n_hashes: int, n_buckets, *, device=None,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random rotations ``(H, D, n_hashes, rotation_columns(n_buckets))``, i.i.d. standard normal, float32."""
    return torch.randn(num_heads, head_dim, n_hashes, rotation_columns(n_buckets), generator=generator,
                       dtype=torch.float32, device=device)


def normalize_keys(qk: torch.Tensor) -> torch.Tensor:
    """k = qk / sqrt(mean(qk^2) + 1e-6) / sqrt(D): the shared-QK keys (unit length, up to eps)."""
    d = qk.shape[-1]
    return qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + NORM_EPS) / d ** 0.5


def padding_mask(batch: int, seq_len: int, padded_len: int, key_padding_mask: Optional[torch.Tensor],
                 device) -> torch.Tensor:
    """Boolean (B, Lp): True for padding (the caller's key_padding_mask, then the internal pad)."""
    pad = torch.zeros(batch, padded_len, dtype=torch.bool, device=device)
    pad[:, seq_len:] = True
    if key_padding_mask is not None:
        pad[:, :seq_len] = key_padding_mask.to(device=device, dtype=torch.bool)
    return pad


def lsh_hash(qk: torch.Tensor, rotations: torch.Tensor, pad: Optional[torch.Tensor] = None,
             n_buckets=None) -> torch.Tensor:
    """Buckets (B, H, n_hashes, L), int64 in [0, n_buckets]; padded tokens get n_buckets.

    qk: (B, H, L, D); rotations: (H, D, n_hashes, columns); pad: (B, L) bool or None. With factors
    ``n_buckets = [n1, n2, ...]`` the columns are one block of ``n_i / 2`` per factor and the bucket is
    ``b1 + n1 * b2 + n1 * n2 * b3 + ...`` (trax's and HF's factorised hash); an int (or None) is one block.
    Hashed in float32 from the detached qk, one matrix product per head.
    """
    B, H, L, D = qk.shape
    _, _, n_hashes, half = rotations.shape
    factors = (2 * half,) if n_buckets is None else bucket_factors(n_buckets)
    x = qk.detach().float()
    rot = rotations.float().reshape(H, D, n_hashes * half)
    projected = torch.matmul(x, rot).view(B, H, L, n_hashes, half)  # (B, H, L, r, columns)
    buckets, start, weight = 0, 0, 1
    for f in factors:
        block = projected[..., start:start + f // 2]
        block = torch.cat([block, -block], dim=-1)
        buckets = buckets + weight * block.argmax(dim=-1)  # first index on ties
        start += f // 2
        weight *= f
    buckets = buckets.permute(0, 1, 3, 2)
    if pad is not None:
        buckets = buckets.masked_fill(pad[:, None, None, :], weight)
    return buckets


def lsh_sort(buckets: torch.Tensor, n_buckets: int, any_padding: bool) -> torch.Tensor:
    """Sorted order of all rounds together: (B, H, n_hashes * L) int64 indices ``r * L + position``.

    The key ``L * (r * n_buckets' + bucket) + position`` is unique, so argsort's order is the
    order (no tie to break).
    """
    B, H, n_hashes, L = buckets.shape
    nb = n_buckets + 1 if any_padding else n_buckets
    rounds = torch.arange(n_hashes, device=buckets.device).view(1, 1, -1, 1)
    pos = torch.arange(L, device=buckets.device).view(1, 1, 1, -1)
    key = L * (rounds * nb + buckets) + pos
    return key.flatten(2).argsort(dim=-1)


def _look_around(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """(B, H, T, C, ...) -> (B, H, T, (before + 1 + after) * C, ...): each chunk with its circular
    neighbours, ``before`` first, in order of offset."""
    return torch.cat([x.roll(shifts=-offset, dims=2) for offset in range(-before, after + 1)], dim=3)


def lsh_attention(qk: torch.Tensor, v: torch.Tensor, *, n_hashes: int, chunk_size: int,
                  n_buckets: Optional[int] = None, causal: bool = False,
                  rotations: Optional[torch.Tensor] = None, n_chunks_before: int = 1,
                  n_chunks_after: int = 0, key_padding_mask: Optional[torch.Tensor] = None,
                  scale: float = 1.0, return_lse: bool = False, return_rotations: bool = False):
    """Reference of :func:`longkernels.lsh_attention`; same arguments, same results.

    qk: (B, H, L, D) shared queries/keys; v: (B, H, L, Dv); key_padding_mask: (B, L) bool, True
    where a token is padding. Computes in float32 (float64 for float64 inputs), returns v's dtype;
    ``lse`` is the log-sum-exp over all rounds' windows, (B, H, L), in the compute dtype.
    """
    B, H, L, D = qk.shape
    Dv = v.shape[-1]
    dtype = v.dtype
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    if n_buckets is None:
        n_buckets = default_n_buckets(L, chunk_size)
    if rotations is None:
        rotations = draw_rotations(H, D, n_hashes, n_buckets, device=qk.device)
    factors, n_buckets = n_buckets, total_buckets(n_buckets)
    C = chunk_size
    Lp = padded_length(L, C)
    T = n_hashes * Lp // C  # chunks over all rounds

    pad = padding_mask(B, L, Lp, key_padding_mask, qk.device)
    qk_p = torch.nn.functional.pad(qk.to(cdt), (0, 0, 0, Lp - L))
    v_p = torch.nn.functional.pad(v.to(cdt), (0, 0, 0, Lp - L))

    buckets = lsh_hash(qk_p, rotations, pad, factors)
    order = lsh_sort(buckets, n_buckets, bool(pad.any()))  # (B, H, n_hashes * Lp): r * Lp + pos
    pos = order % Lp  # original position of each sorted item

    def gather(x):  # (B, H, Lp, d) -> sorted copies (B, H, T, C, d)
        idx = pos.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1])
        return x.gather(2, idx).view(B, H, T, C, x.shape[-1])

    q_s = gather(qk_p)
    k_s = gather(normalize_keys(qk_p))
    v_s = gather(v_p)
    pos_q = pos.view(B, H, T, C)
    k_w = _look_around(k_s, n_chunks_before, n_chunks_after)  # (B, H, T, W, D)
    v_w = _look_around(v_s, n_chunks_before, n_chunks_after)
    pos_k = _look_around(pos_q, n_chunks_before, n_chunks_after)  # (B, H, T, W)

    s = scale * torch.matmul(q_s, k_w.transpose(-1, -2))  # (B, H, T, C, W)
    pq, pk = pos_q.unsqueeze(-1), pos_k.unsqueeze(-2)
    key_pad = pad.view(B, 1, 1, Lp).expand(B, H, T, Lp).gather(3, pos_k).unsqueeze(-2)
    hidden = key_pad | (pk > pq) if causal else key_pad
    s = s.masked_fill(hidden, MASK_VALUE)
    s = s.masked_fill(pk == pq, SELF_MASK_VALUE)

    # Per chunk row: max m, sum l of exp(s - m), output o. lse_r = m + log(l) is kept as the pair
    # (m, l): a row that sees only itself has m = -1e5, where float32's spacing is 0.008, and the
    # sum m + log(l) would lose the weight's first digits (trax and HF do lose them there).
    m_s = s.amax(dim=-1)  # (B, H, T, C)
    e = torch.exp(s - m_s.unsqueeze(-1))
    l_s = e.sum(dim=-1)
    o_s = torch.matmul(e, v_w) / l_s.unsqueeze(-1)  # (B, H, T, C, Dv)

    # Unsort: sorted item i is round order[i] // Lp, position order[i] % Lp.
    def unsort(x):  # (B, H, T, C, ...) -> (B, H, n_hashes, L, ...)
        x = x.reshape(B, H, n_hashes * Lp, -1)
        y = torch.empty_like(x).scatter_(2, order.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]), x)
        return y.view(B, H, n_hashes, Lp, -1)[:, :, :, :L]

    o_r = unsort(o_s)
    m_r, l_r = unsort(m_s).squeeze(-1), unsort(l_s).squeeze(-1)  # (B, H, n_hashes, L)

    # Rounds combine by log-sum-exp: weight of round r = exp(lse_r - logsumexp_r lse_r).
    m = m_r.amax(dim=2, keepdim=True)
    w = torch.exp(m_r - m) * l_r
    den = w.sum(dim=2)
    out = ((w.unsqueeze(-1) * o_r).sum(2) / den.unsqueeze(-1)).to(dtype)
    lse = m.squeeze(2) + torch.log(den)  # (B, H, L)
    result = (out,)
    if return_lse:
        result += (lse,)
    if return_rotations:
        result += (rotations,)
    return result[0] if len(result) == 1 else result
