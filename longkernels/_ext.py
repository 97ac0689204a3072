"""Loads the compiled extension ``longkernels._C`` if it was built, and says why not otherwise.

Importing ``_C`` registers the C++ (and, where compiled, CUDA) kernels as ``torch.ops.longkernels.*``.
The package works without it: Triton and reference paths stay available.
"""
from __future__ import annotations

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from . import _C  # type: ignore[attr-defined]

    LOAD_ERROR: str | None = None
except ImportError as exc:  # not built (pure-Python install) or built against another torch
    _C = None
    LOAD_ERROR = f"longkernels._C is not importable ({exc}); build it with `pip install -e .`"


def available() -> bool:
    return _C is not None


def cuda_compiled() -> bool:
    return _C is not None and bool(_C.cuda_compiled())


def build_info() -> dict:
    if _C is None:
        return {"extension": False, "reason": LOAD_ERROR}
    return {"extension": True, **dict(_C.build_info())}
