"""Argument checks shared by the operations: each raises ``TypeError``/``ValueError`` naming the argument,
before any backend is chosen. The registered ops check again in C++ what memory safety depends on
(``csrc/common/op_checks.h``); these are the friendly floor above that one."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """LSE is float32, except for float64 inputs, where float64 keeps parity tests exact."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(name: str, t, *, ndim: int, layout: str = "(B, H, L, D)") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_int(name: str, value, *, minimum: int, maximum: int = INT64_MAX, why: str = "") -> int:
    """``value`` as an int in ``[minimum, maximum]``; bools are not ints here."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}{why}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum} (what the kernels index with), got {value}")
    return int(value)


def check_scale(name: str, value, default: Optional[float] = None) -> float:
    if value is None and default is not None:
        return float(default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number{' or None' if default is not None else ''}, "
                        f"got {value!r}")
    return float(value)
