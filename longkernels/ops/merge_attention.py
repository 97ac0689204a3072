"""Merging attention over disjoint key sets by the log-sum-exp (docs/semantics.md §7).

Attention of the same queries over key sets ``K_1, ..., K_n`` (outputs ``o_k``, LSEs ``lse_k``) combines into
attention over their union:

    lse = logsumexp_k lse_k,   o = sum_k w_k o_k,   w_k = exp(lse_k - lse).

The gradients are ``d o_k = w_k do`` and ``d lse_k = w_k (do . (o_k - o) + dlse)``. A part whose LSE is
``-inf`` (its keys were all hidden from the row) has ``w_k = 0``: no value, no gradient, no NaN from
``exp(-inf - -inf)``; a row with every part ``-inf`` gets ``o = 0``, ``lse = -inf``. Everything runs in
float32 (float64 when an input is float64) whatever the parts' dtype: this is what keeps a ring's result
from drifting with the number of processes.

The torch expression below is the implementation (a few elementwise passes over the parts); the ring
(longkernels/distributed.py) merges with it too. docs/decisions.md says why there is no fused kernel.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _weights(lses: torch.Tensor):
    """(lse, w) for stacked LSEs ``(n, ...)``: rows with no visible key anywhere get lse -inf and w 0."""
    m = lses.amax(dim=0)
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    lse = m_safe + torch.log(torch.exp(lses - m_safe).sum(dim=0))
    lse_safe = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
    w = torch.exp(lses - lse_safe)  # exp(-inf) = 0 for hidden parts; NaN stays NaN
    return lse, w


class _Merge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, outs, lses):
        lse, w = _weights(lses)
        o = (w.unsqueeze(-1) * outs).sum(dim=0)
        ctx.save_for_backward(outs, w, o)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        outs, w, o = ctx.saved_tensors
        douts = dlses = None
        if do is None:
            do = torch.zeros_like(o)
        if ctx.needs_input_grad[0]:
            douts = w.unsqueeze(-1) * do
        if ctx.needs_input_grad[1]:
            dlses = w * ((outs - o) * do).sum(dim=-1)
            if dlse is not None:
                dlses = dlses + w * dlse
        return douts, dlses


def _check(outs, lses):
    for name, parts in (("outs", outs), ("lses", lses)):
        if isinstance(parts, torch.Tensor) or not isinstance(parts, Sequence):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(parts).__name__}")
        if not parts:
            raise ValueError(f"{name} must hold at least one part")
        for i, t in enumerate(parts):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in _FLOATS:
                raise TypeError(f"{name}[{i}] must be floating point (float16/bfloat16/float32/float64), got {t.dtype}")
    if len(outs) != len(lses):
        raise ValueError(f"outs and lses must hold the same number of parts, got {len(outs)} and {len(lses)}")
    shape, device = tuple(lses[0].shape), lses[0].device
    for i, (o, lse) in enumerate(zip(outs, lses)):
        if tuple(lse.shape) != shape:
            raise ValueError(f"lses[{i}] must have the shape of lses[0] {shape}, got {tuple(lse.shape)}")
        if o.dim() != lse.dim() + 1 or tuple(o.shape[:-1]) != shape:
            raise ValueError(f"outs[{i}] must have shape {shape} + (Dv,) to match lses[{i}], got {tuple(o.shape)}")
        if o.shape[-1] != outs[0].shape[-1]:
            raise ValueError(f"outs[{i}] must have the head dim of outs[0] ({outs[0].shape[-1]}), got {o.shape[-1]}")
        for name, t in ((f"outs[{i}]", o), (f"lses[{i}]", lse)):
            if t.device != device:
                raise ValueError(f"{name} must be on the device of lses[0] ({device}), got {t.device}")


def merge_attention(outs, lses, *, out_dtype: Optional[torch.dtype] = None):
    """Combine attention over disjoint key sets into attention over their union (semantics §7).

    Args:
        outs: parts' outputs, each ``(..., N, Dv)`` (e.g. ``(B, H, N, Dv)``).
        lses: parts' log-sum-exps, each ``(..., N)``, as ``memory_attention(..., return_lse=True)`` gives them.
        out_dtype: dtype of the merged output; default the dtype of ``outs[0]``.

    Returns:
        ``(out, lse)``: ``out`` in ``out_dtype``, ``lse`` float32 (float64 when any input is float64).
        Differentiable in every part. Parts with LSE ``-inf`` contribute nothing; a row whose parts are all
        ``-inf`` gets out 0 and lse -inf.
    """
    _check(outs, lses)
    if out_dtype is not None and out_dtype not in _FLOATS:
        raise TypeError(f"out_dtype must be a floating dtype, got {out_dtype}")
    f64 = any(t.dtype == torch.float64 for t in (*outs, *lses))
    ct = torch.float64 if f64 else torch.float32
    o, lse = _Merge.apply(torch.stack([t.to(ct) for t in outs]), torch.stack([t.to(ct) for t in lses]))
    return o.to(out_dtype or outs[0].dtype), lse
