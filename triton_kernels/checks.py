"""What the Triton launchers' memory safety depends on, checked at entry (``RuntimeError``, as the C++ ops'
TORCH_CHECK): the same rules as ``csrc/common/op_checks.h``. The public functions check first, with errors
that name the argument; these are the floor under the registered ``*_triton`` ops, which users,
``torch.compile`` graphs and exported programs may call directly."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT32_MAX = 2**31 - 1
# |q_offset| bound: the kernels form positions in int32 (csrc/common/op_checks.h allows 2^52 in int64).
MAX_QUERY_OFFSET = 2**30


def require(cond: bool, op: str, message: str) -> None:
    if not cond:
        raise RuntimeError(f"{op}: {message}")


def floating(op: str, name: str, t, ndim: int, device: torch.device) -> None:
    require(isinstance(t, torch.Tensor), op, f"{name} must be a tensor")
    require(t.dim() == ndim, op, f"{name} must have {ndim} dimensions, got {t.dim()}")
    require(t.dtype in _FLOATS, op, f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    require(t.device == device, op, f"{name} must be on {device}, got {t.device}")


def shape(op: str, name: str, t: torch.Tensor, want: Sequence[int]) -> None:
    require(tuple(t.shape) == tuple(want), op, f"{name} must have shape {tuple(want)}, got {tuple(t.shape)}")


def memory_attention(op, q, k, v, mem_k, mem_v, alibi_slopes, window, q_offset=None) -> tuple[int, int]:
    """Returns the window the kernels use (0 also for one that hides nothing) and the position of query 0
    (``q_offset``, default M)."""
    require(isinstance(q, torch.Tensor) and q.dim() == 4, op, "q must be a 4-D tensor (B, H, N, D)")
    for name, t in (("q", q), ("k", k), ("v", v), ("mem_k", mem_k), ("mem_v", mem_v)):
        floating(op, name, t, 4, q.device)
        require(t.dtype == q.dtype, op, f"q, k, v, mem_k and mem_v must share one dtype, got {q.dtype} and {t.dtype}")
    B, H, N, D = q.shape
    Hkv, M, Dv = k.shape[1], mem_k.shape[2], v.shape[3]
    require(Hkv >= 1 and H % Hkv == 0, op, f"the query heads ({H}) must be a multiple of the key/value heads ({Hkv})")
    require(D >= 1 and Dv >= 1, op, f"head dims must be at least 1, got D={D}, Dv={Dv}")
    shape(op, "k", k, (B, Hkv, N, D))
    shape(op, "v", v, (B, Hkv, N, Dv))
    shape(op, "mem_k", mem_k, (B, Hkv, M, D))
    shape(op, "mem_v", mem_v, (B, Hkv, M, Dv))
    if alibi_slopes is not None:
        require(alibi_slopes.dim() == 1 and alibi_slopes.shape[0] == H, op, f"alibi_slopes must have shape (H={H},)")
        require(alibi_slopes.dtype in _FLOATS and alibi_slopes.device == q.device, op,
                f"alibi_slopes must be a floating tensor on {q.device}")
    require(0 <= window, op, f"window must be >= 0 (0: no window), got {window}")
    q0 = M
    if q_offset is not None:
        require(isinstance(q_offset, int) and abs(q_offset) <= MAX_QUERY_OFFSET, op,
                f"q_offset must be an int in [-2^30, 2^30], got {q_offset!r}")
        q0 = int(q_offset)
    return (0 if window >= q0 + N else int(window)), q0


def memory_attention_masks(op, q, mem_k, key_padding_mask, document_ids, softcap, sinks, q0=None) -> None:
    """key_padding_mask (B, M + N) bool, document_ids (B, M + N) integer, softcap finite >= 0, sinks (H,)."""
    B, H, N, _ = q.shape
    L = mem_k.shape[2] + N
    if key_padding_mask is not None:
        require(isinstance(key_padding_mask, torch.Tensor) and key_padding_mask.dtype == torch.bool
                and key_padding_mask.device == q.device, op, f"key_padding_mask must be a bool tensor on {q.device}")
        shape(op, "key_padding_mask", key_padding_mask, (B, L))
    if document_ids is not None:
        require(isinstance(document_ids, torch.Tensor) and not document_ids.is_floating_point()
                and document_ids.dtype != torch.bool and not document_ids.is_complex()
                and document_ids.device == q.device, op, f"document_ids must be an integer tensor on {q.device}")
        shape(op, "document_ids", document_ids, (B, L))
        require(q0 is None or q0 == mem_k.shape[2], op, "document_ids need the queries at positions M + i "
                "(q_offset = M)")
    require(math.isfinite(softcap) and softcap >= 0, op, f"softcap must be finite and >= 0 (0: none), got {softcap}")
    if sinks is not None:
        require(isinstance(sinks, torch.Tensor) and sinks.dim() == 1 and sinks.shape[0] == H, op,
                f"sinks must have shape (H={H},)")
        require(sinks.dtype in _FLOATS and sinks.device == q.device, op, f"sinks must be a floating tensor on {q.device}")


def memory_attention_grads(op, q, k, v, dout, lse, delta) -> None:
    B, H, N, _ = q.shape
    floating(op, "dout", dout, 4, q.device)
    shape(op, "dout", dout, (B, H, N, v.shape[3]))
    for name, t in (("lse", lse), ("delta", delta)):
        floating(op, name, t, 3, q.device)
        shape(op, name, t, (B, H, N))


def relative(op, q, q_pos, mem_k, pos_emb, causal, window) -> None:
    """Transformer-XL relative positions (the C++ ops' check_relative): causal, q_pos like q, pos_emb (H, P, D) of
    q's dtype holding every visible distance; the window as memory_attention returns it (0: none)."""
    B, H, N, D = q.shape
    require(causal, op, "relative positions need causal attention (distances are >= 0)")
    require(isinstance(q_pos, torch.Tensor) and q_pos.shape == q.shape and q_pos.dtype == q.dtype
            and q_pos.device == q.device, op, f"q_pos must have q's shape, dtype and device, got {tuple(q_pos.shape)}")
    require(isinstance(pos_emb, torch.Tensor) and pos_emb.dim() == 3 and pos_emb.shape[0] == H
            and pos_emb.shape[2] == D and pos_emb.dtype == q.dtype and pos_emb.device == q.device, op,
            f"pos_emb must be (H={H}, P, D={D}) of q's dtype and device")
    M = mem_k.shape[2]
    far = (min(window, M + N) if window else M + N) - 1
    require(pos_emb.shape[1] >= far + 1, op, f"pos_emb must hold every visible distance 0 .. {far} (P >= {far + 1}), "
            f"got P={pos_emb.shape[1]}")
    require(pos_emb.shape[1] <= INT32_MAX, op, "pos_emb's P must fit int32 distances")


def lsh_hash_sort(op, qk, rotations, key_padding_mask, n_buckets, padded_len, bucket_factors=None) -> None:
    require(isinstance(qk, torch.Tensor) and qk.dim() == 4, op, "qk must be a 4-D tensor (B, H, L, D)")
    floating(op, "qk", qk, 4, qk.device)
    floating(op, "rotations", rotations, 4, qk.device)
    B, H, L, D = qk.shape
    require(2 <= n_buckets < INT32_MAX and n_buckets % 2 == 0, op, f"n_buckets must be even and >= 2, got {n_buckets}")
    columns = n_buckets // 2
    if bucket_factors is not None:
        require(len(bucket_factors) >= 1 and all(2 <= f < INT32_MAX and f % 2 == 0 for f in bucket_factors), op,
                f"bucket_factors must be even and >= 2, got {list(bucket_factors)}")
        require(math.prod(bucket_factors) == n_buckets, op,
                f"n_buckets ({n_buckets}) must be the product of bucket_factors ({list(bucket_factors)})")
        columns = sum(bucket_factors) // 2
    want = (H, D, rotations.shape[2], columns)
    shape(op, "rotations", rotations, want)
    require(L <= padded_len <= INT32_MAX and rotations.shape[2] * padded_len <= INT32_MAX, op,
            f"padded_len must be >= L={L} and n_hashes * padded_len fit int32, got {padded_len}")
    if key_padding_mask is not None:
        require(key_padding_mask.dtype == torch.bool and key_padding_mask.device == qk.device, op,
                f"key_padding_mask must be a bool tensor on {qk.device}")
        shape(op, "key_padding_mask", key_padding_mask, (B, L))


def lsh_attention(op, qk, v, perm, key_padding_mask, chunk_size, before, after) -> None:
    require(isinstance(qk, torch.Tensor) and qk.dim() == 4, op, "qk must be a 4-D tensor (B, H, L, D)")
    floating(op, "qk", qk, 4, qk.device)
    floating(op, "v", v, 4, qk.device)
    require(v.dtype == qk.dtype, op, f"v must have qk's dtype {qk.dtype}, got {v.dtype}")
    B, H, L, D = qk.shape
    shape(op, "v", v, (B, H, L, v.shape[3]))
    require(v.shape[3] >= 1 and D >= 1, op, "head dims must be at least 1")
    require(isinstance(perm, torch.Tensor) and perm.dtype == torch.int32 and perm.dim() == 4
            and perm.device == qk.device and tuple(perm.shape[:2]) == (B, H), op,
            f"perm must be an int32 tensor (B={B}, H={H}, n_hashes, padded_len) on {qk.device}")
    nh, Lp = perm.shape[2], perm.shape[3]
    require(nh >= 1, op, "perm must hold at least one round")
    require(chunk_size >= 1 and Lp >= L and Lp % chunk_size == 0, op,
            f"perm's padded length {Lp} must be >= L={L} and a multiple of chunk_size={chunk_size}")
    require(nh * Lp <= INT32_MAX, op, "n_hashes * padded_len exceeds int32 indices")
    require(before >= 0 and after >= 0 and (before + 1 + after) * chunk_size <= INT32_MAX, op,
            f"n_chunks_before={before} and n_chunks_after={after} must be >= 0 and the window fit int32 columns")
    if key_padding_mask is not None:
        require(key_padding_mask.dtype == torch.bool and key_padding_mask.device == qk.device, op,
                f"key_padding_mask must be a bool tensor on {qk.device}")
        shape(op, "key_padding_mask", key_padding_mask, (B, L))
    rows = perm.reshape(-1, Lp)
    in_range = bool(((rows >= 0) & (rows < Lp)).all())
    require(in_range, op, f"perm's entries must lie in [0, {Lp})")
    counts = torch.zeros(rows.shape, dtype=torch.int32, device=rows.device)
    counts.scatter_add_(1, rows.long(), torch.ones_like(rows))
    require(bool((counts == 1).all()), op, f"perm must hold a permutation of [0, {Lp}) in every round")


def lsh_attention_grads(op, qk, v, dout, lse_max, lse_log, delta: Optional[torch.Tensor]) -> None:
    B, H, L, _ = qk.shape
    floating(op, "dout", dout, 4, qk.device)
    shape(op, "dout", dout, (B, H, L, v.shape[3]))
    for name, t in (("lse_max", lse_max), ("lse_log", lse_log), ("delta", delta)):
        if t is not None:
            floating(op, name, t, 3, qk.device)
            shape(op, name, t, (B, H, L))


def reversible_coupling(op, y, fy, dy, dgrad, *, inplace: bool) -> None:
    require(isinstance(y, torch.Tensor) and y.dtype in (torch.float32, torch.float64), op,
            "y (the stream) must be a float32 or float64 tensor")
    require(dy.dtype == y.dtype, op, f"dy must have y's dtype ({y.dtype}), got {dy.dtype}")
    for name, t in (("fy", fy), ("dy", dy), ("dgrad", dgrad)):
        require(t.dtype in _FLOATS, op, f"{name} must be a floating tensor, got {t.dtype}")
        require(t.shape == y.shape and t.device == y.device, op, f"{name} must have y's shape and device")
    if inplace:
        require(not shares_memory(dy, dy, internal=True), op, "dy must not have overlapping elements (an expanded view)")
        for name, t in (("y", y), ("fy", fy), ("dgrad", dgrad)):
            require(not shares_memory(dy, t), op, f"dy (written in place) must not share memory with {name}")


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    if t.numel() == 0:
        return 0, 0
    start = t.storage_offset() * t.element_size()
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    return start, start + extent * t.element_size()


def shares_memory(a: torch.Tensor, b: torch.Tensor, *, internal: bool = False) -> bool:
    """Whether ``a`` and ``b`` may refer to a common element (byte ranges of one storage intersect; a
    conservative answer), or with ``internal``, whether ``a`` has two elements at one address (a zero
    stride, the common case, or any other self-overlap of a non-dense layout)."""
    if internal:
        if any(s == 0 and n > 1 for n, s in zip(a.shape, a.stride())):
            return True
        lo, hi = _byte_range(a)
        return a.numel() > 1 and (hi - lo) < a.numel() * a.element_size()
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, a1 = _byte_range(a)
    b0, b1 = _byte_range(b)
    return a0 < b1 and b0 < a1
