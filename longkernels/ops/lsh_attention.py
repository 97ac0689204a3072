"""LSH attention (Reformer): validation, backend choice and the autograd.Function.

The math is in ``longkernels/reference/lsh_attention.py``. A call runs two stages:

    hash_sort(qk, rotations, key_padding_mask, n_buckets, Lp) -> (buckets, perm)
        C++ (``csrc/cpu/lsh_attention.cpp``) on CPU tensors, CUDA (``csrc/cuda/lsh_attention.cu``)
        on CUDA tensors, else ``torch.argsort`` on the composite key (the reference's code).
    fwd(qk, v, perm, key_padding_mask, chunk_size, before, after, causal, scale)
        -> (out, lse_max, lse_log)
    bwd(dout, qk, v, perm, key_padding_mask, lse_max, lse_log, out, dlse, chunk_size, before, after,
        causal, scale) -> (dqk, dv)      (delta = rowsum(dout * out) - dlse formed inside)
        C++ on CPU tensors, Triton (``triton_kernels/lsh_attention.py``) on CUDA tensors and, under
        ``TRITON_INTERPRET=1``, on CPU tensors.

``perm`` (B, H, n_hashes, Lp) int32 is all the backward needs of the hashing: the rotations are not
re-applied, so a backward never re-hashes (and never sees different buckets). ``dqk`` holds both paths
through qk, as queries and through the normalised keys ``k = qk / rms(qk) / sqrt(D)``: the C++ kernel
applies that chain in its final pass; the Triton kernels return the key-side gradient apart and
:func:`normalize_keys_backward` applies it. Outputs and gradients come back in their inputs' memory
layout, so a layer's (B, L, H, D) <-> (B, H, L, D) transposes stay views.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _ext
from . import dispatch
from ..reference import lsh_attention as _reference
from ..reference.lsh_attention import (NORM_EPS, bucket_factors, default_n_buckets, draw_rotations, lsh_hash,
                                       lsh_sort, padded_length, padding_mask, rotation_columns)
from .memory_attention import TRITON_MAX_HEAD_DIM
from .validation import INT32_MAX, check_int, check_scale, check_tensor, lse_dtype

BACKENDS = ("cpu", "triton", "reference")


# --------------------------------------------------------------------------------------------
# Validation: once, here, before any backend is chosen. Backends trust what passes.
# --------------------------------------------------------------------------------------------
def validate(qk, v, n_hashes, chunk_size, n_buckets, causal, rotations, n_chunks_before, n_chunks_after,
             key_padding_mask, scale):
    """Checks every argument; returns (n_hashes, chunk_size, n_buckets, before, after, scale), ``n_buckets``
    an int or a tuple of factors (a single factor comes back as an int).

    A ``chunk_size`` above ``L`` comes back as ``L``: either way each round is one chunk, and the
    internal padding a larger chunk would add is masked, so the result is the same (without the work)."""
    check_tensor("qk", qk, ndim=4)
    check_tensor("v", v, ndim=4)
    if v.dtype != qk.dtype:
        raise TypeError(f"v must have the dtype of qk ({qk.dtype}), got {v.dtype}")
    if v.device != qk.device:
        raise ValueError(f"v must be on the device of qk ({qk.device}), got {v.device}")
    B, H, L, D = qk.shape
    if tuple(v.shape[:3]) != (B, H, L):
        raise ValueError(f"v must be (B, H, L, Dv) = ({B}, {H}, {L}, Dv) like qk, got {tuple(v.shape)}")
    if L < 1 or D < 1 or v.shape[3] < 1 or B < 1 or H < 1:
        raise ValueError(f"qk and v need non-empty dimensions, got qk {tuple(qk.shape)}, v {tuple(v.shape)}")
    if L > INT32_MAX:
        raise ValueError(f"qk's length {L} exceeds the int32 positions of the kernels")
    n_hashes = check_int("n_hashes", n_hashes, minimum=1, maximum=INT32_MAX)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1, maximum=INT32_MAX)
    before = check_int("n_chunks_before", n_chunks_before, minimum=0, maximum=INT32_MAX)
    after = check_int("n_chunks_after", n_chunks_after, minimum=0, maximum=INT32_MAX)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    scale = check_scale("scale", scale)
    if rotations is not None:
        if not isinstance(rotations, torch.Tensor):
            raise TypeError(f"rotations must be a torch.Tensor or None, got {type(rotations).__name__}")
        if not rotations.is_floating_point():
            raise TypeError(f"rotations must be a floating-point tensor, got {rotations.dtype}")
        if rotations.device != qk.device:
            raise ValueError(f"rotations must be on the device of qk ({qk.device}), got {rotations.device}")
        if rotations.dim() != 4 or tuple(rotations.shape[:3]) != (H, D, n_hashes):
            raise ValueError(f"rotations must be (H, D, n_hashes, n_buckets // 2) = ({H}, {D}, {n_hashes}, ...), "
                             f"got {tuple(rotations.shape)}")
        if n_buckets is None:
            n_buckets = 2 * rotations.shape[3]
    if n_buckets is None:
        n_buckets = default_n_buckets(L, chunk_size)
    if isinstance(n_buckets, (list, tuple)):
        if not n_buckets:
            raise ValueError("n_buckets as factors must hold at least one factor, got []")
        factors = tuple(check_int("n_buckets", f, minimum=2, maximum=INT32_MAX - 1) for f in n_buckets)
        if any(f % 2 for f in factors):
            raise ValueError(f"each factor of n_buckets must be even (buckets come in +/- pairs), got {list(factors)}")
        if math.prod(factors) >= INT32_MAX:
            raise ValueError(f"the product of n_buckets' factors {list(factors)} exceeds the int32 buckets")
        n_buckets = factors[0] if len(factors) == 1 else factors
    else:
        n_buckets = check_int("n_buckets", n_buckets, minimum=2, maximum=INT32_MAX - 1)
        if n_buckets % 2:
            raise ValueError(f"n_buckets must be even (buckets come in +/- pairs of rotations), got {n_buckets}")
    if rotations is not None and rotations.shape[3] != rotation_columns(n_buckets):
        raise ValueError(f"rotations must be (H, D, n_hashes, {rotation_columns(n_buckets)}) for n_buckets = "
                         f"{n_buckets} (n / 2, or sum(factors) / 2), got last dimension {rotations.shape[3]}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, L):
            raise ValueError(f"key_padding_mask must be (B, L) = ({B}, {L}), got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != qk.device:
            raise ValueError(f"key_padding_mask must be on the device of qk ({qk.device}), "
                             f"got {key_padding_mask.device}")
    chunk_size = min(chunk_size, L)
    Lp = padded_length(L, chunk_size)
    if n_hashes * Lp > INT32_MAX:
        raise ValueError(f"n_hashes * padded length = {n_hashes} * {Lp} exceeds the int32 indices of the kernels: "
                         "fewer n_hashes or a shorter sequence")
    if (before + 1 + after) * chunk_size > INT32_MAX:
        raise ValueError(f"n_chunks_before + 1 + n_chunks_after = {before + 1 + after} chunks of {chunk_size} "
                         "exceed the int32 columns of the kernels' look-around window")
    return n_hashes, chunk_size, n_buckets, before, after, scale


# --------------------------------------------------------------------------------------------
# Backends: each says why it cannot take an input; ops/dispatch.py picks one.
# --------------------------------------------------------------------------------------------
def not_supported_reasons(backend: str, qk: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Why ``backend`` cannot run LSH attention on these inputs (empty list: it can)."""
    device = qk.device.type
    if backend == "reference":
        return []
    if backend == "cpu":
        return dispatch.extension_reasons(device)
    if backend == "triton":
        return dispatch.triton_reasons(device, head_dim=max(qk.shape[-1], v.shape[-1]),
                                       max_head_dim=TRITON_MAX_HEAD_DIM, dtype=qk.dtype)
    return [f"unknown backend {backend!r}; expected one of {BACKENDS}"]


def device_order(device_type: str) -> tuple[str, ...]:
    return ("triton", "reference") if device_type == "cuda" else ("cpu", "reference")


def choose_backend(qk: torch.Tensor, v: torch.Tensor, backend: Optional[str]) -> str:
    """``backend`` (a demand), else ``LONGKERNELS_BACKEND`` (a preference), else the device's order."""
    return dispatch.choose("lsh_attention", BACKENDS, lambda name: not_supported_reasons(name, qk, v),
                           device_order(qk.device.type), backend)


def hash_sort_backend(qk: torch.Tensor) -> str:
    """Which implementation hashes and sorts: the extension's op for the device (plain or factorised
    buckets), else torch."""
    if _ext.available() and (qk.device.type == "cpu" or (qk.device.type == "cuda" and _ext.cuda_compiled())):
        return "extension"
    return "torch"


# --------------------------------------------------------------------------------------------
# Torch ops, with fake (meta) implementations so torch.compile traces through them.
# --------------------------------------------------------------------------------------------
def _hash_sort_fake(qk, rotations, key_padding_mask, n_buckets, padded_len, bucket_factors=None):
    B, H = qk.shape[:2]
    shape = (B, H, rotations.shape[2], padded_len)
    return qk.new_empty(shape, dtype=torch.int32), qk.new_empty(shape, dtype=torch.int32)


def _like_rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised, shaped like ``t``, in its memory layout (the kernels' outputs do so)."""
    r = torch.empty_like(t, dtype=dtype, memory_format=torch.preserve_format)
    return r if r.stride(3) == 1 else torch.empty(t.shape, dtype=dtype, device=t.device)


def _fwd_fake(qk, v, perm, key_padding_mask, chunk_size, n_chunks_before, n_chunks_after, causal, scale):
    B, H, L, _ = qk.shape
    stats = qk.new_empty(B, H, L, dtype=lse_dtype(v.dtype))
    return _like_rows(v, v.dtype), stats, torch.empty_like(stats)


def _triton_fwd_fake(qk, v, perm, key_padding_mask, chunk_size, n_chunks_before, n_chunks_after, causal, scale):
    out, lse_max, lse_log = _fwd_fake(qk, v, perm, key_padding_mask, chunk_size, n_chunks_before, n_chunks_after,
                                      causal, scale)
    return out.contiguous(), lse_max, lse_log  # the Triton launcher writes a contiguous output


def _bwd_fake(dout, qk, v, perm, key_padding_mask, lse_max, lse_log, out, dlse, chunk_size, n_chunks_before,
              n_chunks_after, causal, scale):
    ct = lse_dtype(v.dtype)
    return _like_rows(qk, ct), _like_rows(v, ct)


@torch.library.custom_op("longkernels::lsh_hash_sort_torch", mutates_args=())
def _torch_hash_sort(qk: torch.Tensor, rotations: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                     n_buckets: int, padded_len: int,
                     bucket_factors: Optional[list[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton_kernels import checks
    checks.lsh_hash_sort("lsh_hash_sort_torch", qk, rotations, key_padding_mask, n_buckets, padded_len,
                         bucket_factors)
    B, H, L, _ = qk.shape
    pad = padding_mask(B, L, padded_len, key_padding_mask, qk.device)
    qk_p = torch.nn.functional.pad(qk.detach().float(), (0, 0, 0, padded_len - L))
    buckets = lsh_hash(qk_p, rotations, pad, list(bucket_factors) if bucket_factors else n_buckets)
    order = lsh_sort(buckets, n_buckets, True)  # padding's extra bucket: same order either way
    perm = (order % padded_len).view(buckets.shape)
    return buckets.int(), perm.int()


@torch.library.custom_op("longkernels::lsh_attention_fwd_triton", mutates_args=())
def _triton_fwd(qk: torch.Tensor, v: torch.Tensor, perm: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                chunk_size: int, n_chunks_before: int, n_chunks_after: int, causal: bool,
                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton_kernels import checks, lsh_attention as tk
    checks.lsh_attention("lsh_attention_fwd_triton", qk, v, perm, key_padding_mask, chunk_size, n_chunks_before,
                         n_chunks_after)
    return tk.lsh_attention_fwd(qk, v, perm, key_padding_mask, chunk_size, n_chunks_before, n_chunks_after,
                                causal, scale)


def _delta(dout: torch.Tensor, out: torch.Tensor, dlse: Optional[torch.Tensor], ct: torch.dtype) -> torch.Tensor:
    """delta_i = <dout_i, out_i> - dlse_i in the compute dtype (the C++ kernel forms it itself)."""
    delta = (dout.to(ct) * out.to(ct)).sum(-1)
    return delta if dlse is None else delta - dlse.to(ct)


@torch.library.custom_op("longkernels::lsh_attention_bwd_triton", mutates_args=())
def _triton_bwd(dout: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, perm: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor], lse_max: torch.Tensor, lse_log: torch.Tensor,
                out: torch.Tensor, dlse: Optional[torch.Tensor], chunk_size: int, n_chunks_before: int,
                n_chunks_after: int, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton_kernels import checks, lsh_attention as tk
    op = "lsh_attention_bwd_triton"
    checks.lsh_attention(op, qk, v, perm, key_padding_mask, chunk_size, n_chunks_before, n_chunks_after)
    checks.lsh_attention_grads(op, qk, v, dout, lse_max, lse_log, dlse)
    checks.floating(op, "out", out, 4, qk.device)
    checks.shape(op, "out", out, dout.shape)
    delta = _delta(dout, out, dlse, lse_max.dtype)
    dq, dk, dv = tk.lsh_attention_bwd(dout, qk, v, perm, key_padding_mask, lse_max, lse_log, delta, chunk_size,
                                      n_chunks_before, n_chunks_after, causal, scale)
    dqk = dq + normalize_keys_backward(qk.to(dq.dtype), dk)
    return _like_rows(qk, dq.dtype).copy_(dqk), _like_rows(v, dv.dtype).copy_(dv)


_torch_hash_sort.register_fake(_hash_sort_fake)
_triton_fwd.register_fake(_triton_fwd_fake)
_triton_bwd.register_fake(_bwd_fake)

if _ext.available():
    torch.library.register_fake("longkernels::lsh_hash_sort")(_hash_sort_fake)
    torch.library.register_fake("longkernels::lsh_attention_fwd")(_fwd_fake)
    torch.library.register_fake("longkernels::lsh_attention_bwd")(_bwd_fake)


def hash_sort(qk, rotations, key_padding_mask, n_buckets, padded_len):
    """Buckets and sorted order, (B, H, n_hashes, Lp) int32 each (see csrc/ops.cpp). ``n_buckets``: an int, or
    a tuple of factors (their product is the number of buckets)."""
    factors = bucket_factors(n_buckets)
    total = math.prod(factors)
    op = (torch.ops.longkernels.lsh_hash_sort if hash_sort_backend(qk) == "extension"
          else torch.ops.longkernels.lsh_hash_sort_torch)
    return op(qk.detach(), rotations.detach().float(), key_padding_mask, total, padded_len,
              list(factors) if len(factors) > 1 else None)


def _kernels(backend):
    if backend == "triton":
        return torch.ops.longkernels.lsh_attention_fwd_triton, torch.ops.longkernels.lsh_attention_bwd_triton
    return torch.ops.longkernels.lsh_attention_fwd, torch.ops.longkernels.lsh_attention_bwd


def normalize_keys_backward(qk: torch.Tensor, dk: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. qk of <dk, k(qk)> for k = qk * n, n = rsqrt(mean(qk^2) + eps) / sqrt(D):
    dqk = n dk - qk n <qk, dk> / (D (mean(qk^2) + eps))."""
    d = qk.shape[-1]
    ms = qk.pow(2).mean(-1, keepdim=True) + NORM_EPS
    n = torch.rsqrt(ms) / math.sqrt(d)
    return n * (dk - qk * ((qk * dk).sum(-1, keepdim=True) / (d * ms)))


class LSHAttentionFunction(torch.autograd.Function):
    """Hash, sort and attend in the forward; the backward reuses the sorted order and the saved
    row statistics (no re-hashing, no stored probabilities)."""

    @staticmethod
    def forward(ctx, qk, v, rotations, key_padding_mask, n_buckets, chunk_size, before, after, causal, scale,
                backend):
        L = qk.shape[2]
        _, perm = hash_sort(qk, rotations, key_padding_mask, n_buckets, padded_length(L, chunk_size))
        fwd, _ = _kernels(backend)
        out, lse_max, lse_log = fwd(qk, v, perm, key_padding_mask, chunk_size, before, after, causal, scale)
        ctx.save_for_backward(qk, v, perm, key_padding_mask, out, lse_max, lse_log)
        ctx.args = (chunk_size, before, after, causal, scale, backend)
        ctx.set_materialize_grads(False)
        return out, lse_max + lse_log

    @staticmethod
    def backward(ctx, dout, dlse):
        qk, v, perm, key_padding_mask, out, lse_max, lse_log = ctx.saved_tensors
        chunk_size, before, after, causal, scale, backend = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        # The kernels form delta_i = <dout_i, out_i> - dlse_i (_delta). With P the combined
        # probabilities over all rounds' windows (exp(s - lse)), ds = P (dP - delta): the rounds'
        # weights need no term of their own, because the combination is one softmax over the union
        # of the windows.
        _, bwd = _kernels(backend)
        dqk, dv = bwd(dout, qk, v, perm, key_padding_mask, lse_max, lse_log, out, dlse, chunk_size, before, after,
                      causal, scale)
        return dqk.to(qk.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None, None


class LSHAttentionFromOrder(torch.autograd.Function):
    """The attention of :class:`LSHAttentionFunction` over a sorted order ``perm`` computed elsewhere (HF's
    reversible backward replays the forward's buckets: the order comes from them, nothing is hashed).
    ``perm``: (B, H, n_hashes, Lp) int32, each round a permutation of its positions (the op checks it)."""

    @staticmethod
    def forward(ctx, qk, v, perm, key_padding_mask, chunk_size, before, after, causal, scale, backend):
        fwd, _ = _kernels(backend)
        out, lse_max, lse_log = fwd(qk, v, perm, key_padding_mask, chunk_size, before, after, causal, scale)
        ctx.save_for_backward(qk, v, perm, key_padding_mask, out, lse_max, lse_log)
        ctx.args = (chunk_size, before, after, causal, scale, backend)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, dout):
        grads = LSHAttentionFunction.backward(ctx, dout, None)
        return grads[:2] + (None,) * 8


def lsh_attention(qk, v, *, n_hashes, chunk_size, n_buckets=None, causal=False, rotations=None,
                  n_chunks_before=1, n_chunks_after=0, key_padding_mask=None, scale=1.0, return_lse=False,
                  return_rotations=False, backend=None):
    """Reformer's LSH attention with shared queries and keys (docs/semantics.md §2).

    Args:
        qk: ``(B, H, L, D)`` shared queries/keys; keys are their length-normalised copies.
        v: ``(B, H, L, Dv)`` values.
        n_hashes: rounds of hashing; their outputs combine by log-sum-exp.
        chunk_size: queries per chunk of the sorted sequence; any ``L`` works (padded internally).
        n_buckets: even; default the largest power of two <= ``2 * L / chunk_size`` (at least 2), or
            ``2 * rotations.shape[-1]`` when ``rotations`` is given. A list ``[n1, n2, ...]`` of even factors
            hashes factorised (trax's and HF's form): one rotation block of ``n_i / 2`` columns per factor,
            bucket ``b1 + n1 * b2 + ...``, ``prod(n_i)`` buckets for ``sum(n_i) / 2`` columns.
        causal: mask keys at later positions than the query.
        rotations: ``(H, D, n_hashes, n_buckets // 2)`` (``sum(factors) // 2`` columns for factors); drawn from
            torch's RNG when None.
        n_chunks_before, n_chunks_after: neighbouring chunks each chunk also attends to.
        key_padding_mask: ``(B, L)`` bool, True where a token is padding (PyTorch's convention;
            HuggingFace's ``attention_mask`` is its negation).
        scale: multiplies the logits ``<qk_i, k_j>``; 1.0 as in Reformer (the keys are unit length).
        return_lse: also return the log-sum-exp over all rounds' windows, ``(B, H, L)``, float32
            (float64 for float64 inputs).
        return_rotations: also return the rotations used (the ones drawn, when none were given).
        backend: ``"cpu"``, ``"triton"`` or ``"reference"``; default by device, overridable by the
            ``LONGKERNELS_BACKEND`` environment variable.

    Returns:
        ``out`` ``(B, H, L, Dv)`` in v's dtype; then ``lse`` and ``rotations`` when asked.
    """
    n_hashes, chunk_size, n_buckets, before, after, scale = validate(
        qk, v, n_hashes, chunk_size, n_buckets, causal, rotations, n_chunks_before, n_chunks_after,
        key_padding_mask, scale)
    name = choose_backend(qk, v, backend)
    if rotations is None:
        B, H, L, D = qk.shape
        rotations = draw_rotations(H, D, n_hashes, n_buckets, device=qk.device)
    if name == "reference":
        out, lse = _reference(qk, v, n_hashes=n_hashes, chunk_size=chunk_size, n_buckets=n_buckets,
                                      causal=causal, rotations=rotations, n_chunks_before=before,
                                      n_chunks_after=after, key_padding_mask=key_padding_mask, scale=scale,
                                      return_lse=True)
    else:
        out, lse = LSHAttentionFunction.apply(qk, v, rotations, key_padding_mask, n_buckets, chunk_size, before,
                                              after, causal, scale, name)
    result = (out,)
    if return_lse:
        result += (lse,)
    if return_rotations:
        result += (rotations,)
    return result[0] if len(result) == 1 else result
