"""Triton kernel of a reversible block's backward coupling (``longkernels/reversible.py``), one pass:

    x      = y  - fy.to(y.dtype)        reconstruct the block's input
    dy_out = dy + dgrad.to(dy.dtype)    accumulate the gradient that came back through F or G

over the flattened stream. ``y`` and ``dy`` are the float32 (float64 under the interpreter) stream,
``fy`` and ``dgrad`` any float dtype; every widening is exact and each result is one add or subtract in
the stream dtype, so the outputs are bitwise the torch expressions'. The launchers take and return what
the C++ op schemas ``reversible_coupling`` / ``reversible_coupling_`` in ``csrc/ops.cpp`` declare.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .tuning import LAUNCH_OPTIONS

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Elements per program: 4 per thread at 8 warps on a GPU; small under the interpreter (tests change it).
BLOCK = 1024 if _INTERPRET else 4096


@triton.jit
def _widen(v, dtype: tl.constexpr):
    # bfloat16 by its bits (exact everywhere, subnormals included: the interpreter's own cast rounds
    # those to 0 or to float32's smallest normal); other dtypes by a plain cast.
    if v.dtype == tl.bfloat16:
        v = (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _coupling_kernel(y_ptr, fy_ptr, dy_ptr, dg_ptr, x_ptr, dyo_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    y = tl.load(y_ptr + offs, mask=m)
    fy = _widen(tl.load(fy_ptr + offs, mask=m), y.dtype)
    tl.store(x_ptr + offs, y - fy, mask=m)
    dy = tl.load(dy_ptr + offs, mask=m)
    dg = _widen(tl.load(dg_ptr + offs, mask=m), dy.dtype)
    tl.store(dyo_ptr + offs, dy + dg, mask=m)


def _launch(y, fy, dy, dgrad, x, dyo):
    n = y.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, BLOCK),)
    _coupling_kernel[grid](y, fy, dy, dgrad, x, dyo, n, BLOCK=BLOCK, num_warps=8, **LAUNCH_OPTIONS)


def reversible_coupling(y: torch.Tensor, fy: torch.Tensor, dy: torch.Tensor, dgrad: torch.Tensor):
    """``(y - fy.to(y.dtype), dy + dgrad.to(dy.dtype))``, contiguous, in one pass."""
    y, fy, dy, dgrad = (t.contiguous() for t in (y, fy, dy, dgrad))
    x = torch.empty_like(y)
    dyo = torch.empty_like(dy)
    _launch(y, fy, dy, dgrad, x, dyo)
    return x, dyo


def reversible_coupling_(y: torch.Tensor, fy: torch.Tensor, dy: torch.Tensor, dgrad: torch.Tensor):
    """``y - fy.to(y.dtype)``, with ``dy += dgrad`` in place (in the same pass)."""
    y, fy, dgrad = (t.contiguous() for t in (y, fy, dgrad))
    x = torch.empty_like(y)
    if dy.is_contiguous():
        _launch(y, fy, dy, dgrad, x, dy)
    else:
        dc = dy.contiguous()
        _launch(y, fy, dc, dgrad, x, dc)
        dy.copy_(dc)
    return x
