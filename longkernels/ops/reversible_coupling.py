"""Coupling arithmetic of a reversible block's backward step, fused into one pass over the stream.

``longkernels/reversible.py`` does, per block and branch, ``x = y - fy.to(stream)`` (reconstruct the
block's input) and ``dy = dy + dgrad`` (accumulate the gradient that came back through F or G).
:func:`reversible_coupling` does both in one pass: ``csrc/cpu/reversible_coupling.cpp`` on CPU tensors,
``triton_kernels/reversible_coupling.py`` on CUDA tensors (and on CPU tensors under ``TRITON_INTERPRET=1``), and
the torch expressions themselves (``torch``) for everything else. All three give bitwise the same result:
every widening is exact and each output element is one IEEE add or subtract in the stream dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from . import dispatch

BACKENDS = ("cpu", "triton", "torch")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STREAMS = (torch.float32, torch.float64)


def validate(y, fy, dy, dgrad) -> None:
    """TypeError for a non-tensor or a non-float tensor, ValueError for a shape, dtype pairing or device
    mismatch; each names the argument."""
    named = {"y": y, "fy": fy, "dy": dy, "dgrad": dgrad}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if dy.dtype != y.dtype:
        raise TypeError(f"dy must have the stream dtype of y ({y.dtype}), got {dy.dtype}")
    for name, t in named.items():
        if t.shape != y.shape:
            raise ValueError(f"{name} must have y's shape {tuple(y.shape)}, got {tuple(t.shape)}")
        if t.device != y.device:
            raise ValueError(f"{name} must be on y's device ({y.device}), got {t.device}")


def not_supported_reasons(backend: str, y: torch.Tensor) -> list[str]:
    """Why ``backend`` cannot run the coupling of stream ``y`` (empty list: it can)."""
    if backend == "torch":
        return []
    if backend not in BACKENDS:
        return [f"unknown backend {backend!r}; expected one of {BACKENDS}"]
    device = y.device.type
    reasons = []
    if y.dtype not in _STREAMS:
        reasons.append(f"the fused kernels take a float32 or float64 stream, got {y.dtype}")
    if backend == "cpu":
        return reasons + dispatch.extension_reasons(device)
    reasons += dispatch.triton_reasons(device)
    if y.dtype == torch.float64 and device == "cuda":
        reasons.append("a float64 stream runs on the CPU kernel and the Triton interpreter, not on GPU Triton")
    return reasons


def device_order(device_type: str) -> tuple[str, ...]:
    return {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")}.get(device_type, ("torch",))


def choose_backend(y: torch.Tensor, backend: Optional[str]) -> str:
    """``backend`` (a demand), else ``LONGKERNELS_BACKEND`` (a preference), else ``cpu`` for CPU tensors
    and ``triton`` for CUDA tensors where they can run the input, else ``torch``."""
    return dispatch.choose("reversible_coupling", BACKENDS, lambda name: not_supported_reasons(name, y),
                           device_order(y.device.type), backend)


# --------------------------------------------------------------------------------------------
# Torch ops: the C++ ones are defined by csrc/ops.cpp, the Triton launchers wrapped here; fakes for all.
# --------------------------------------------------------------------------------------------
def _fake(y, fy, dy, dgrad):
    return torch.empty_like(y, memory_format=torch.contiguous_format), torch.empty_like(
        dy, memory_format=torch.contiguous_format)


def _fake_(y, fy, dy, dgrad):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.custom_op("longkernels::reversible_coupling_triton", mutates_args=())
def _triton_coupling(y: torch.Tensor, fy: torch.Tensor, dy: torch.Tensor,
                     dgrad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton_kernels import checks, reversible_coupling as tk
    checks.reversible_coupling("reversible_coupling_triton", y, fy, dy, dgrad, inplace=False)
    return tk.reversible_coupling(y, fy, dy, dgrad)


@torch.library.custom_op("longkernels::reversible_coupling_triton_", mutates_args=("dy",))
def _triton_coupling_(y: torch.Tensor, fy: torch.Tensor, dy: torch.Tensor, dgrad: torch.Tensor) -> torch.Tensor:
    from ..triton_kernels import checks, reversible_coupling as tk
    checks.reversible_coupling("reversible_coupling_triton_", y, fy, dy, dgrad, inplace=True)
    return tk.reversible_coupling_(y, fy, dy, dgrad)


_triton_coupling.register_fake(_fake)
_triton_coupling_.register_fake(_fake_)

if _ext.available():
    torch.library.register_fake("longkernels::reversible_coupling")(_fake)
    torch.library.register_fake("longkernels::reversible_coupling_")(_fake_)


def reversible_coupling(y: torch.Tensor, fy: torch.Tensor, dy: torch.Tensor, dgrad: torch.Tensor, *,
             inplace: bool = False, backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y - fy.to(y.dtype), dy + dgrad.to(dy.dtype))`` in one pass over the stream.

    Args:
        y: the block's output stream (float32 or float64 for the fused kernels; any float for ``torch``).
        fy: the branch output ``F(.)`` or ``G(.)``, any float dtype (e.g. bfloat16 before its cast).
        dy: the gradient of the other stream, in ``y``'s dtype.
        dgrad: the gradient that came back through the branch, any float dtype.
        inplace: write ``dy + dgrad`` into ``dy`` (which the caller must own: nothing else may see it)
            and return ``dy``; saves a fresh output.
        backend: ``"cpu"``, ``"triton"`` or ``"torch"``; default ``cpu`` for CPU tensors and
            ``triton`` for CUDA tensors where they can run the input, else ``torch``.

    Returns:
        ``(x, dy_out)``: ``x`` contiguous, bitwise ``y - fy.to(y.dtype)``; ``dy_out`` bitwise
        ``dy + dgrad.to(dy.dtype)`` (``dy`` itself when ``inplace``).
    """
    validate(y, fy, dy, dgrad)
    if inplace and not torch.compiler.is_compiling():  # traced: the op checks at run time (C++, Triton body)
        from ..triton_kernels.checks import shares_memory

        if shares_memory(dy, dy, internal=True):
            raise ValueError("dy (written in place) must not have overlapping elements (an expanded view); "
                             "pass dy.clone() or inplace=False")
        for name, t in (("y", y), ("fy", fy), ("dgrad", dgrad)):
            if shares_memory(dy, t):
                raise ValueError(f"dy (written in place) must not share memory with {name}; pass inplace=False")
    name = choose_backend(y, backend)
    if name == "torch":
        x = y - fy.to(y.dtype)
        if inplace:
            return x, dy.add_(dgrad.to(dy.dtype))
        return x, dy + dgrad.to(dy.dtype)
    ops = torch.ops.longkernels
    if inplace:
        x = (ops.reversible_coupling_triton_ if name == "triton" else ops.reversible_coupling_)(y, fy, dy, dgrad)
        return x, dy
    return (ops.reversible_coupling_triton if name == "triton" else ops.reversible_coupling)(y, fy, dy, dgrad)
