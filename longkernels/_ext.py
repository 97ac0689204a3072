"""Loads the compiled extension ``longkernels._C`` if it was built for this torch, and says why not otherwise.

Importing ``_C`` registers the C++ (and, where compiled, CUDA) kernels as ``torch.ops.longkernels.*``.
The package works without it (Triton and reference paths stay available, with a warning on each
operation that would have used it: ``ops/dispatch.py``).

An extension is only loaded under the torch it was built against: ``setup.py`` records that version in
``longkernels/_built_with.py`` (plain Python, readable when the binary is not), and a mismatch leaves
``_C`` unloaded with an :class:`ExtensionWarning` that names both versions and the command to rebuild:
a binary built against another torch can fail to load, or load and then misbehave.
"""
from __future__ import annotations

import warnings

import torch  # noqa: F401  (libtorch must be loaded before the extension)

REBUILD = "pip install --no-build-isolation .  (from a checkout: pip install --no-build-isolation -e .)"


class ExtensionWarning(UserWarning):
    """longkernels._C is missing, broken or built against another torch."""


def _built_with():
    try:
        from . import _built_with as rec  # type: ignore[attr-defined]
    except ImportError:
        return None
    return getattr(rec, "TORCH_VERSION", None)


BUILT_TORCH = _built_with()
_C = None
LOAD_ERROR: str | None = None

if BUILT_TORCH is not None and BUILT_TORCH != torch.__version__:
    LOAD_ERROR = (f"longkernels._C was built against torch {BUILT_TORCH} but torch {torch.__version__} is running; "
                  f"it is not loaded. Rebuild it for this torch: {REBUILD}")
    warnings.warn(LOAD_ERROR, ExtensionWarning, stacklevel=2)
else:
    try:
        from . import _C  # type: ignore[attr-defined]  # noqa: F811
    except ImportError as exc:
        _C = None
        if BUILT_TORCH is None and "_C" in str(exc) and "cannot import name" in str(exc):
            LOAD_ERROR = f"longkernels._C is not built (a pure-Python install or checkout); build it with {REBUILD}"
        else:
            LOAD_ERROR = f"longkernels._C failed to load ({exc}); rebuild it with {REBUILD}"
    if _C is not None:
        built = dict(_C.build_info()).get("torch_version_built")
        if built is not None and built not in (torch.__version__, torch.__version__.split("+")[0]):
            LOAD_ERROR = (f"longkernels._C was built against torch {built} but torch {torch.__version__} is "
                          f"running; it is not used. Rebuild it for this torch: {REBUILD}")
            warnings.warn(LOAD_ERROR, ExtensionWarning, stacklevel=2)
            _C = None


def available() -> bool:
    return _C is not None


def cuda_compiled() -> bool:
    return _C is not None and bool(_C.cuda_compiled())


def build_info() -> dict:
    """How the extension was built, with the torch it was built against and the one running."""
    versions = {"torch_version_built": BUILT_TORCH, "torch_version_running": torch.__version__}
    if _C is None:
        return {"extension": False, "reason": LOAD_ERROR, **versions}
    info = dict(_C.build_info())
    versions["torch_version_built"] = BUILT_TORCH or info.pop("torch_version_built", None)
    info.pop("torch_version_built", None)
    return {"extension": True, **info, **versions}
