"""Memory-segment causal attention: validation, backend choice and the autograd.Function.

The math is in ``longkernels/reference/memory_attention.py``; the kernels are
``csrc/cpu/memory_attention.cpp`` (CPU), ``csrc/cuda/memory_attention.cu`` (CUDA) and
``triton_kernels/memory_attention.py`` (Triton). All take the same arguments:

    fwd(q, k, v, mem_k, mem_v, alibi_slopes, causal, window, scale,
        key_padding_mask, document_ids, softcap, sinks, q_offset) -> (out, lse)
    bwd(dout, q, k, v, mem_k, mem_v, alibi_slopes, lse, delta, causal, window, scale,
        key_padding_mask, document_ids, softcap, q_offset) -> (dq, dk, dv, dmem_k, dmem_v)

with ``window = 0`` for no window, ``softcap = 0`` for none, ``mem_k``/``mem_v`` always tensors
(``M = 0`` when there is no memory), ``q_offset`` None for queries at ``M + i`` (else query ``i`` sits at
``q_offset + i``: a ring step's block pair, see :func:`block_attention`) and ``delta = rowsum(dout * out) - dlse`` (the LSE's own gradient
folded in). The LSE includes the sinks, so the backward needs none of them: the sinks' own gradient is
``-sum_i exp(sink - lse_i) * delta_i``, formed here.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .. import _ext
from . import dispatch
from ..reference import memory_attention as _reference
from .validation import INT64_MAX, check_int, check_scale, check_tensor, lse_dtype

BACKENDS = ("cpu", "triton", "cuda", "reference")
# Triton's tile sizes are powers of two; larger head dims do not fit its shared-memory budget.
TRITON_MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------
# Validation: once, here, before any backend is chosen. Backends trust what passes.
# --------------------------------------------------------------------------------------------
def _check_like_q(q, **named):
    for name, t in named.items():
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")


def _check_per_head(name, t, q):
    """A floating ``(H,)`` tensor on q's device: one value per query head (ALiBi slopes, sinks)."""
    H = q.shape[1]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (H,), got {type(t).__name__}")
    if tuple(t.shape) != (H,):
        raise ValueError(f"{name} must have shape (H={H},), one value per query head, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")


def validate(q, k, v, mem_k, mem_v, causal, window, scale, alibi_slopes):
    """Checks every argument; returns (mem_k, mem_v, window, scale, alibi_slopes) normalised.

    ``window`` comes back as 0 for no window, and also for a window that hides nothing
    (``window >= M + N``: the same visible keys), so the kernels never see a window beyond the keys."""
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    _check_like_q(q, k=k, v=v)
    B, H, N, D = q.shape
    if k.shape[0] != B or k.shape[2] != N or k.shape[3] != D:
        raise ValueError(f"k must have shape (B={B}, Hkv, N={N}, D={D}) to match q, got {tuple(k.shape)}")
    Hkv = k.shape[1]
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of k's heads ({Hkv})")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape (B={B}, Hkv={Hkv}, N={N}, Dv), got {tuple(v.shape)}")
    Dv = v.shape[3]
    if D < 1 or Dv < 1:
        raise ValueError(f"head dims must be at least 1, got D={D} (q, k) and Dv={Dv} (v)")
    if N < 1:
        raise ValueError("q must hold at least one query (q.shape[2] >= 1)")

    if (mem_k is None) != (mem_v is None):
        raise ValueError("mem_k and mem_v must be given together (both tensors or both None)")
    if mem_k is None:
        mem_k = q.new_empty(B, Hkv, 0, D)
        mem_v = q.new_empty(B, Hkv, 0, Dv)
    else:
        check_tensor("mem_k", mem_k, ndim=4)
        check_tensor("mem_v", mem_v, ndim=4)
        _check_like_q(q, mem_k=mem_k, mem_v=mem_v)
        M = mem_k.shape[2]
        if tuple(mem_k.shape) != (B, Hkv, M, D):
            raise ValueError(f"mem_k must have shape (B={B}, Hkv={Hkv}, M, D={D}), got {tuple(mem_k.shape)}")
        if tuple(mem_v.shape) != (B, Hkv, M, Dv):
            raise ValueError(f"mem_v must have shape (B={B}, Hkv={Hkv}, M={M}, Dv={Dv}), got {tuple(mem_v.shape)}")

    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if window is None:
        window = 0
    else:
        window = check_int("window", window, minimum=1, maximum=INT64_MAX,
                           why=" (a query sees at most `window` keys, itself included: a window below 1 "
                               "leaves it no visible key)")
        if window >= mem_k.shape[2] + N:
            window = 0
    scale = check_scale("scale", scale, default=D ** -0.5)
    if alibi_slopes is not None:
        _check_per_head("alibi_slopes", alibi_slopes, q)
        if alibi_slopes.requires_grad:
            raise ValueError("alibi_slopes receive no gradient (as in FlashAttention); pass a tensor that "
                             "does not require grad, e.g. slopes.detach()")
        alibi_slopes = alibi_slopes.to(lse_dtype(q.dtype)).contiguous()
    return mem_k, mem_v, window, scale, alibi_slopes


def validate_masks(q, mem_k, key_padding_mask, document_ids, softcap, sinks):
    """Checks the masks and score terms of semantics §1; returns them normalised (softcap 0.0 for none,
    sinks in the LSE's dtype, an all-False padding mask as None)."""
    B, H, N, _ = q.shape
    L = mem_k.shape[2] + N
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool torch.Tensor of shape (B, M + N), "
                            f"got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = padding), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, L):
            raise ValueError(f"key_padding_mask must have shape (B={B}, M + N={L}) over memory then segment, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on the device of q ({q.device}), "
                             f"got {key_padding_mask.device}")
    if document_ids is not None:
        if not isinstance(document_ids, torch.Tensor):
            raise TypeError(f"document_ids must be an integer torch.Tensor of shape (B, M + N), "
                            f"got {type(document_ids).__name__}")
        if document_ids.dtype.is_floating_point or document_ids.dtype.is_complex or document_ids.dtype == torch.bool:
            raise TypeError(f"document_ids must be an integer tensor, got {document_ids.dtype}")
        if tuple(document_ids.shape) != (B, L):
            raise ValueError(f"document_ids must have shape (B={B}, M + N={L}) over memory then segment, "
                             f"got {tuple(document_ids.shape)}")
        if document_ids.device != q.device:
            raise ValueError(f"document_ids must be on the device of q ({q.device}), got {document_ids.device}")
        if L > 1 and bool((document_ids[:, 1:] < document_ids[:, :-1]).any()):
            raise ValueError("document_ids must be non-decreasing along the sequence (packed documents, one "
                             "after another)")
    if softcap is None:
        softcap = 0.0
    else:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not math.isfinite(softcap):
            raise TypeError(f"softcap must be a finite number or None, got {softcap!r}")
        if softcap <= 0:
            raise ValueError(f"softcap must be > 0 (None: no softcap), got {softcap}")
        softcap = float(softcap)
    if sinks is not None:
        _check_per_head("sinks", sinks, q)
    return key_padding_mask, document_ids, softcap, sinks


def validate_relative(q, mem_k, causal, window, alibi, masks, pos_emb, content_bias, pos_bias) -> None:
    """Transformer-XL relative positions (semantics §9): causal, no second position scheme, no masks."""
    B, H, N, D = q.shape
    if pos_emb is None:
        raise ValueError("content_bias and pos_bias need pos_emb (the relative-position embeddings)")
    if not isinstance(pos_emb, torch.Tensor):
        raise TypeError(f"pos_emb must be a torch.Tensor of shape (H, P, D), got {type(pos_emb).__name__}")
    if pos_emb.dim() != 3 or pos_emb.shape[0] != H or pos_emb.shape[2] != D:
        raise ValueError(f"pos_emb must have shape (H={H}, P, D={D}), got {tuple(pos_emb.shape)}")
    _check_like_q(q, pos_emb=pos_emb)
    for name, t in (("content_bias", content_bias), ("pos_bias", pos_bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (H, D), got {type(t).__name__}")
        if tuple(t.shape) != (H, D):
            raise ValueError(f"{name} must have shape (H={H}, D={D}), got {tuple(t.shape)}")
        _check_like_q(q, **{name: t})
    if not causal:
        raise ValueError("pos_emb needs causal=True (relative distances (M + i) - j are >= 0 only for causal "
                         "attention)")
    if alibi is not None:
        raise ValueError("pos_emb and alibi_slopes are two position schemes; pass one")
    if any(m is not None for m in masks):
        raise ValueError("pos_emb does not combine with key_padding_mask, document_ids, softcap or sinks")
    M = mem_k.shape[2]
    far = (min(window, M + N) if window else M + N) - 1
    if pos_emb.shape[1] < far + 1:
        raise ValueError(f"pos_emb must hold every visible distance 0 .. {far}: P >= {far + 1}, got "
                         f"P={pos_emb.shape[1]}")


def _rel_kernels(backend):
    if backend == "triton":
        return (torch.ops.longkernels.memory_attention_rel_fwd_triton,
                torch.ops.longkernels.memory_attention_rel_bwd_triton)
    return torch.ops.longkernels.memory_attention_rel_fwd, torch.ops.longkernels.memory_attention_rel_bwd


class RelativeMemoryAttentionFunction(torch.autograd.Function):
    """The relative-position kernels; q + content_bias and q + pos_bias are formed outside (autograd gives the
    biases their gradients as the sums of the two query gradients)."""

    @staticmethod
    def forward(ctx, qu, qv, k, v, mem_k, mem_v, pos_emb, causal, window, scale, has_mem, backend="cpu"):
        out, lse = _rel_kernels(backend)[0](qu, qv, k, v, mem_k, mem_v, pos_emb, causal, window, scale)
        ctx.save_for_backward(qu, qv, k, v, mem_k, mem_v, pos_emb, out, lse)
        ctx.args = (causal, window, scale, has_mem, backend)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        qu, qv, k, v, mem_k, mem_v, pos_emb, out, lse = ctx.saved_tensors
        causal, window, scale, has_mem, backend = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
        if dlse is not None:
            delta = delta - dlse
        dqu, dqv, dk, dv, dmk, dmv, dpos = _rel_kernels(backend)[1](
            dout, qu, qv, k, v, mem_k, mem_v, pos_emb, lse, delta, causal, window, scale)
        if not has_mem:
            dmk = dmv = None
        return dqu, dqv, dk, dv, dmk, dmv, dpos, None, None, None, None, None


def _relative(q, k, v, mem_k, mem_v, has_mem, causal, window, scale, return_lse, pos_emb, content_bias, pos_bias,
              backend):
    H, D = q.shape[1], q.shape[3]
    name = dispatch.choose("memory_attention", BACKENDS, lambda n: relative_reasons(n, q, v),
                           relative_order(q.device.type), backend)
    if name == "reference":
        return _reference(q, k, v, mem_k if has_mem else None, mem_v if has_mem else None, causal=causal,
                          window=window or None, scale=scale, return_lse=return_lse, pos_emb=pos_emb,
                          content_bias=content_bias, pos_bias=pos_bias)
    qu = q if content_bias is None else q + content_bias.view(1, H, 1, D)
    qv = q if pos_bias is None else q + pos_bias.view(1, H, 1, D)
    out, lse = RelativeMemoryAttentionFunction.apply(qu, qv, k, v, mem_k, mem_v, pos_emb, causal, window, scale,
                                                     has_mem, name)
    return (out, lse) if return_lse else out


def relative_order(device_type: str) -> tuple[str, ...]:
    return ("triton", "reference") if device_type == "cuda" else ("cpu", "reference")


def relative_reasons(backend: str, q: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Why ``backend`` cannot run relative-position attention (the C++ CPU kernels, Triton and the reference can;
    the compiled CUDA kernels cannot)."""
    if backend == "reference":
        return []
    if backend == "cpu":
        return dispatch.extension_reasons(q.device.type)
    if backend == "triton":
        return dispatch.triton_reasons(q.device.type, head_dim=max(q.shape[-1], v.shape[-1]),
                                       max_head_dim=TRITON_MAX_HEAD_DIM, dtype=q.dtype)
    return [f"relative positions (pos_emb) run in the C++ CPU kernels, Triton and the reference, not in {backend}"]


# --------------------------------------------------------------------------------------------
# Backends: each says why it cannot take an input; ops/dispatch.py picks one.
# --------------------------------------------------------------------------------------------
def not_supported_reasons(backend: str, q: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Why ``backend`` cannot run memory attention on these inputs (empty list: it can). Every backend takes
    every option of semantics §1 and ``q_offset``: only the device, dtype and head dim decide."""
    device = q.device.type
    if backend == "reference":
        return []
    if backend == "cpu":
        return dispatch.extension_reasons(device)
    if backend == "triton":
        return dispatch.triton_reasons(device, head_dim=max(q.shape[-1], v.shape[-1]),
                                       max_head_dim=TRITON_MAX_HEAD_DIM, dtype=q.dtype)
    if backend == "cuda":
        return dispatch.cuda_extension_reasons(device)
    return [f"unknown backend {backend!r}; expected one of {BACKENDS}"]


def device_order(device_type: str) -> tuple[str, ...]:
    return ("triton", "cuda", "reference") if device_type == "cuda" else ("cpu", "reference")


def choose_backend(q: torch.Tensor, v: torch.Tensor, backend: Optional[str]) -> str:
    """``backend`` (a demand), else ``LONGKERNELS_BACKEND`` (a preference), else the device's order."""
    return dispatch.choose("memory_attention", BACKENDS, lambda name: not_supported_reasons(name, q, v),
                           device_order(q.device.type), backend)


# --------------------------------------------------------------------------------------------
# Torch ops. The C++/CUDA ops are defined by csrc/ops.cpp; Triton launchers are wrapped here,
# and every op gets a fake (meta) implementation so torch.compile traces through it.
# --------------------------------------------------------------------------------------------
def _fwd_fake(q, k, v, mem_k, mem_v, alibi_slopes, causal, window, scale, key_padding_mask=None,
              document_ids=None, softcap=0.0, sinks=None, q_offset=None):
    B, H, N, _ = q.shape
    out = q.new_empty(B, H, N, v.shape[-1])
    lse = q.new_empty(B, H, N, dtype=lse_dtype(q.dtype))
    return out, lse


def _bwd_fake(dout, q, k, v, mem_k, mem_v, alibi_slopes, lse, delta, causal, window, scale, key_padding_mask=None,
              document_ids=None, softcap=0.0, q_offset=None):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(mem_k), torch.empty_like(mem_v))


@torch.library.custom_op("longkernels::memory_attention_fwd_triton", mutates_args=())
def _triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor,
                alibi_slopes: Optional[torch.Tensor], causal: bool, window: int, scale: float,
                key_padding_mask: Optional[torch.Tensor] = None, document_ids: Optional[torch.Tensor] = None,
                softcap: float = 0.0, sinks: Optional[torch.Tensor] = None, q_offset: Optional[int] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton_kernels import checks, memory_attention as tk
    op = "memory_attention_fwd_triton"
    window, q0 = checks.memory_attention(op, q, k, v, mem_k, mem_v, alibi_slopes, window, q_offset)
    checks.memory_attention_masks(op, q, mem_k, key_padding_mask, document_ids, softcap, sinks, q0)
    return tk.memory_attention_fwd(q, k, v, mem_k, mem_v, alibi_slopes, causal, window, scale,
                                   key_padding_mask, document_ids, softcap, sinks, q0)


@torch.library.custom_op("longkernels::memory_attention_bwd_triton", mutates_args=())
def _triton_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mem_k: torch.Tensor,
                mem_v: torch.Tensor, alibi_slopes: Optional[torch.Tensor], lse: torch.Tensor, delta: torch.Tensor,
                causal: bool, window: int, scale: float, key_padding_mask: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None, softcap: float = 0.0, q_offset: Optional[int] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton_kernels import checks, memory_attention as tk
    op = "memory_attention_bwd_triton"
    window, q0 = checks.memory_attention(op, q, k, v, mem_k, mem_v, alibi_slopes, window, q_offset)
    checks.memory_attention_grads(op, q, k, v, dout, lse, delta)
    checks.memory_attention_masks(op, q, mem_k, key_padding_mask, document_ids, softcap, None, q0)
    return tk.memory_attention_bwd(dout, q, k, v, mem_k, mem_v, alibi_slopes, lse, delta, causal, window, scale,
                                   key_padding_mask, document_ids, softcap, q0)


_triton_fwd.register_fake(_fwd_fake)
_triton_bwd.register_fake(_bwd_fake)


@torch.library.custom_op("longkernels::memory_attention_rel_fwd_triton", mutates_args=())
def _triton_rel_fwd(q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mem_k: torch.Tensor,
                    mem_v: torch.Tensor, pos_emb: torch.Tensor, causal: bool, window: int, scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton_kernels import checks, relative_attention as tr
    op = "memory_attention_rel_fwd_triton"
    window, _ = checks.memory_attention(op, q, k, v, mem_k, mem_v, None, window)
    checks.relative(op, q, q_pos, mem_k, pos_emb, causal, window)
    return tr.relative_fwd(q, q_pos, k, v, mem_k, mem_v, pos_emb, window, scale)


@torch.library.custom_op("longkernels::memory_attention_rel_bwd_triton", mutates_args=())
def _triton_rel_bwd(dout: torch.Tensor, q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mem_k: torch.Tensor, mem_v: torch.Tensor, pos_emb: torch.Tensor, lse: torch.Tensor,
                    delta: torch.Tensor, causal: bool, window: int, scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor]:
    from ..triton_kernels import checks, relative_attention as tr
    op = "memory_attention_rel_bwd_triton"
    window, _ = checks.memory_attention(op, q, k, v, mem_k, mem_v, None, window)
    checks.memory_attention_grads(op, q, k, v, dout, lse, delta)
    checks.relative(op, q, q_pos, mem_k, pos_emb, causal, window)
    return tr.relative_bwd(dout, q, q_pos, k, v, mem_k, mem_v, pos_emb, lse, delta, window, scale)


def _rel_fwd_fake(q, q_pos, k, v, mem_k, mem_v, pos_emb, causal, window, scale):
    return _fwd_fake(q, k, v, mem_k, mem_v, None, causal, window, scale)


def _rel_bwd_fake(dout, q, q_pos, k, v, mem_k, mem_v, pos_emb, lse, delta, causal, window, scale):
    return (torch.empty_like(q), torch.empty_like(q_pos), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(mem_k), torch.empty_like(mem_v), torch.empty_like(pos_emb))


_triton_rel_fwd.register_fake(_rel_fwd_fake)
_triton_rel_bwd.register_fake(_rel_bwd_fake)

if _ext.available():
    torch.library.register_fake("longkernels::memory_attention_fwd")(_fwd_fake)
    torch.library.register_fake("longkernels::memory_attention_bwd")(_bwd_fake)

    torch.library.register_fake("longkernels::memory_attention_rel_fwd")(_rel_fwd_fake)
    torch.library.register_fake("longkernels::memory_attention_rel_bwd")(_rel_bwd_fake)


def _kernels(backend):
    if backend == "triton":
        return torch.ops.longkernels.memory_attention_fwd_triton, torch.ops.longkernels.memory_attention_bwd_triton
    return torch.ops.longkernels.memory_attention_fwd, torch.ops.longkernels.memory_attention_bwd


class MemoryAttentionFunction(torch.autograd.Function):
    """Fused forward; backward recomputes the probabilities from the saved LSE."""

    @staticmethod
    def forward(ctx, q, k, v, mem_k, mem_v, sinks, alibi_slopes, masks, causal, window, scale, softcap, backend,
                has_mem, q_offset=None):
        kpm, docs = masks
        fwd, _ = _kernels(backend)
        out, lse = fwd(q, k, v, mem_k, mem_v, alibi_slopes, causal, window, scale, kpm, docs, softcap, sinks, q_offset)
        ctx.save_for_backward(q, k, v, mem_k, mem_v, sinks, alibi_slopes, kpm, docs, out, lse)
        ctx.args = (causal, window, scale, softcap, backend, has_mem, q_offset)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, mem_k, mem_v, sinks, alibi_slopes, kpm, docs, out, lse = ctx.saved_tensors
        causal, window, scale, softcap, backend, has_mem, q_offset = ctx.args
        _, bwd = _kernels(backend)
        if dout is None:
            dout = torch.zeros_like(out)
        # delta_i = sum_d dout_id * out_id - dlse_i: the softmax Jacobian's row term, with the
        # LSE's own incoming gradient folded in (d lse_i / d s_ij = p_ij).
        delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
        if dlse is not None:
            delta = delta - dlse
        dq, dk, dv, dmk, dmv = bwd(dout, q, k, v, mem_k, mem_v, alibi_slopes, lse, delta, causal, window, scale,
                                   kpm, docs, softcap, q_offset)
        if not has_mem:
            dmk = dmv = None
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[5]:
            # The sink is one more logit carrying no value: its softmax weight exp(sink - lse_i) times
            # (0 - delta_i), summed over batch and queries.
            w = torch.exp(sinks.to(lse.dtype).view(1, -1, 1) - lse)
            dsinks = -(w * delta).sum(dim=(0, 2)).to(sinks.dtype)
        return dq, dk, dv, dmk, dmv, dsinks, None, None, None, None, None, None, None, None, None


def memory_attention(q, k, v, mem_k=None, mem_v=None, *, causal=True, window=None, scale=None,
                     alibi_slopes=None, return_lse=False, key_padding_mask=None, document_ids=None, softcap=None,
                     sinks=None, pos_emb=None, content_bias=None, pos_bias=None, backend=None):
    """Attention of the current segment's queries over cached memory and the segment itself.

    Args:
        q: ``(B, H, N, D)`` queries at absolute positions ``M .. M + N - 1``.
        k, v: ``(B, Hkv, N, D)`` and ``(B, Hkv, N, Dv)``: the current segment's keys and values.
        mem_k, mem_v: ``(B, Hkv, M, D)`` and ``(B, Hkv, M, Dv)`` cached keys/values of earlier
            segments (positions ``0 .. M - 1``), or None.
        causal: query ``i`` sees keys ``j <= M + i`` (bottom-right aligned).
        window: query ``i`` additionally sees only keys ``j > M + i - window``.
        scale: logit scale, default ``D ** -0.5``.
        alibi_slopes: ``(H,)``; adds ``-slope_h * (M + i - j)`` to the logits.
        return_lse: also return the float32 log-sum-exp of the logits, ``(B, H, N)``.
        key_padding_mask: ``(B, M + N)`` bool over memory then segment, True = padding (hidden).
        document_ids: ``(B, M + N)`` integers, non-decreasing: a query sees only keys of its document.
        softcap: ``softcap * tanh(scale q.k / softcap)`` replaces the scaled dot product (Gemma 2).
        sinks: ``(H,)`` one extra logit per head in every row's softmax, carrying no value (GPT-OSS);
            receives a gradient when it requires one.
        pos_emb: ``(H, P, D)`` Transformer-XL relative positions: the projected embedding of each distance
            ``d = (M + i) - j`` at index ``d`` (``P`` at least the largest visible distance + 1); causal only.
            The logit becomes ``scale * (<q_i + content_bias, k_j> + <q_i + pos_bias, pos_emb[h, d]>)``, the
            shift done per tile inside the kernel. Receives a gradient, as do the biases.
        content_bias, pos_bias: ``(H, D)``, Transformer-XL's ``r_w_bias`` and ``r_r_bias`` (default zero).
        backend: ``"cpu"``, ``"triton"``, ``"cuda"`` or ``"reference"``; default by device,
            overridable by the ``LONGKERNELS_BACKEND`` environment variable.

    Returns:
        ``out`` of shape ``(B, H, N, Dv)`` in q's dtype, and ``lse`` when ``return_lse``. A row whose
        visible keys are all masked gets ``out`` 0 and ``lse`` -inf (the sink's logit with sinks).
    """
    has_mem = mem_k is not None
    mem_k, mem_v, window_i, scale_f, alibi = validate(q, k, v, mem_k, mem_v, causal, window, scale, alibi_slopes)
    kpm, docs, cap, sinks = validate_masks(q, mem_k, key_padding_mask, document_ids, softcap, sinks)
    if pos_emb is not None or content_bias is not None or pos_bias is not None:
        validate_relative(q, mem_k, causal, window_i, alibi, (kpm, docs, cap or None, sinks), pos_emb, content_bias,
                          pos_bias)
        return _relative(q, k, v, mem_k, mem_v, has_mem, causal, window_i, scale_f, return_lse, pos_emb,
                         content_bias, pos_bias, backend)
    name = choose_backend(q, v, backend)
    if name == "reference":
        return _reference(q, k, v, mem_k if has_mem else None, mem_v if has_mem else None, causal=causal,
                          window=window_i or None, scale=scale_f, alibi_slopes=alibi, return_lse=return_lse,
                          key_padding_mask=kpm, document_ids=docs, softcap=cap or None, sinks=sinks)
    sinks_c = None if sinks is None else sinks.to(lse_dtype(q.dtype))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, mem_k, mem_v, sinks)):
        out, lse = MemoryAttentionFunction.apply(q, k, v, mem_k, mem_v, sinks_c, alibi, (kpm, docs), causal,
                                                 window_i, scale_f, cap, name, has_mem)
    else:  # inference (a decoding step): the op alone, without the autograd Function's ~10 us a call
        out, lse = _kernels(name)[0](q, k, v, mem_k, mem_v, alibi, causal, window_i, scale_f, kpm, docs, cap,
                                     sinks_c)
    return (out, lse) if return_lse else out


def block_attention(q, k, v, *, q_offset, causal=True, window=None, scale=None, alibi_slopes=None,
                    key_padding_mask=None, backend=None):
    """One block pair of a ring: queries at positions ``q_offset + i`` over keys at positions ``0 .. N - 1``.

    ``q`` ``(B, H, N, D)``, ``k``/``v`` ``(B, Hkv, N, D | Dv)`` (a ring's blocks have one length);
    visibility and ALiBi distances as :func:`memory_attention` with query ``i`` at ``q_offset + i``
    (semantics §1 and §8). Returns ``(out, lse)`` with gradients to q, k, v and through the LSE; a row
    that sees no key of the block gets ``out`` 0 and ``lse`` -inf, so :func:`longkernels.merge_attention`
    ignores it. ``key_padding_mask`` ``(B, N)`` hides keys of the block (a ring's padded or unsent rows).
    ``q_offset = 0`` is the diagonal block, ``q_offset >= N`` a block of earlier keys,
    ``q_offset < 0`` later keys (non-causal attention). One call of the fused kernels: no mask tensor.
    """
    if isinstance(q_offset, bool) or not isinstance(q_offset, numbers.Integral):
        raise TypeError(f"q_offset must be an int, got {type(q_offset).__name__}")
    q_offset = int(q_offset)
    if abs(q_offset) > 2**30:
        raise ValueError(f"q_offset must lie in [-2^30, 2^30], got {q_offset}")
    mem_k, mem_v, _, scale_f, alibi = validate(q, k, v, None, None, causal, None, scale, alibi_slopes)
    kpm = validate_masks(q, mem_k, key_padding_mask, None, None, None)[0]
    N = q.shape[2]
    window_i = 0
    if window is not None:
        window_i = check_int("window", window, minimum=1, maximum=INT64_MAX)
        if window_i >= q_offset + N:  # no visible pair is that far apart
            window_i = 0
    name = choose_backend(q, v, backend)
    if name == "reference":
        return _reference(q, k, v, causal=causal, window=window_i or None, scale=scale_f, alibi_slopes=alibi,
                          return_lse=True, key_padding_mask=kpm, q_offset=q_offset)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return MemoryAttentionFunction.apply(q, k, v, mem_k, mem_v, None, alibi, (kpm, None), causal, window_i,
                                             scale_f, 0.0, name, False, q_offset)
    return _kernels(name)[0](q, k, v, mem_k, mem_v, alibi, causal, window_i, scale_f, kpm, None, 0.0, None,
                             q_offset)
