"""Backend choice, shared by every operation (xformers' dispatch: backends that explain themselves).

Each operation names its backends, a function giving the reasons a backend cannot take an input (an
empty list: it can), and the order in which a device tries them. :func:`choose` then applies one rule
for all of them:

* ``backend=`` (an argument) is a demand: that backend runs, or a ``ValueError`` lists why it cannot.
* ``LONGKERNELS_BACKEND`` (the environment) is a preference: used where it can take the input, skipped
  otherwise (``longkernels info`` and :func:`preference_report` say why); the device's order then decides.
* The device's order: the first backend that can take the input. When the first choice of the device
  cannot (the extension is not built or failed to load, triton is missing, an input the fast kernels do
  not take), the call runs on the next one and a :class:`FallbackWarning` says so, once per operation and
  reason; :func:`fallbacks` counts every such call, for ``longkernels info`` and for tests.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Callable, Optional, Sequence

ENV_BACKEND = "LONGKERNELS_BACKEND"


class FallbackWarning(UserWarning):
    """A call ran on a slower backend than its device's first choice (the message says why)."""


_lock = threading.Lock()
_warned: set = set()
_counts: dict = {}


# --------------------------------------------------------------------------------------------
# Reasons shared by the operations' backends
# --------------------------------------------------------------------------------------------
def extension_reasons(device_type: str) -> list:
    """Why the C++ CPU kernels (of any operation) cannot take tensors on ``device_type``."""
    from .. import _ext

    reasons = []
    if not _ext.available():
        reasons.append(_ext.LOAD_ERROR)
    if device_type != "cpu":
        reasons.append(f"the C++ CPU kernels take CPU tensors, got {device_type}")
    return reasons


def cuda_extension_reasons(device_type: str) -> list:
    """Why the compiled CUDA kernels cannot take tensors on ``device_type``."""
    from .. import _ext

    reasons = []
    if not _ext.cuda_compiled():
        reasons.append("longkernels._C was built without CUDA kernels" if _ext.available() else _ext.LOAD_ERROR)
    if device_type != "cuda":
        reasons.append(f"the CUDA kernels take CUDA tensors, got {device_type}")
    return reasons


def triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


def triton_reasons(device_type: str, *, head_dim: Optional[int] = None, max_head_dim: Optional[int] = None,
                   dtype=None) -> list:
    """Why Triton kernels (of any operation) cannot run on ``device_type``; with ``head_dim``/``max_head_dim``
    and ``dtype``, also why not for that attention input (float64 runs only under the interpreter)."""
    import torch

    reasons = []
    if head_dim is not None and max_head_dim is not None and head_dim > max_head_dim:
        reasons.append(f"head dim {head_dim} exceeds the Triton kernel's {max_head_dim}")
    if dtype == torch.float64 and device_type == "cuda":
        reasons.append("float64 runs on the CPU backends and the Triton interpreter, not on GPU Triton")
    err = triton_import_error()
    if err:
        reasons.append(err)
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        reasons.append("Triton runs on CPU tensors only under the interpreter: set TRITON_INTERPRET=1 "
                       "before triton is imported")
    elif device_type not in ("cpu", "cuda"):
        reasons.append(f"Triton kernels take CUDA tensors, got {device_type}")
    return reasons


# --------------------------------------------------------------------------------------------
# The choice
# --------------------------------------------------------------------------------------------
def preference() -> Optional[str]:
    """The backend named by ``LONGKERNELS_BACKEND``, or None."""
    return os.environ.get(ENV_BACKEND) or None


def _record(op: str, chosen: str, skipped: str, why: Sequence[str]) -> None:
    reason = "; ".join(why)
    key = (op, skipped, chosen, reason)
    with _lock:
        _counts[key] = _counts.get(key, 0) + 1
        first = key not in _warned
        _warned.add(key)
    if first:
        warnings.warn(f"longkernels.{op}: the {skipped!r} backend cannot run this call ({reason}); running "
                      f"{chosen!r} instead, which is slower. `longkernels info` lists the backends and why "
                      f"each is unavailable; pass backend={chosen!r} to choose it explicitly.",
                      FallbackWarning, stacklevel=4)


def choose(op: str, backends: Sequence[str], reasons: Callable[[str], list], order: Sequence[str],
           backend: Optional[str] = None) -> str:
    """The backend that runs ``op`` (see the module's docstring for the rule).

    Args:
        op: the operation's name, for messages and the fallback counts.
        backends: every backend the operation has.
        reasons: ``reasons(name)``: why ``name`` cannot take this call's inputs (empty: it can).
        order: the device's order of preference; its last entry must always be able to run.
        backend: an explicit demand, or None.
    """
    if backend is not None:
        if backend not in backends:
            raise ValueError(f"backend must be one of {tuple(backends)} or None, got {backend!r}")
        why = reasons(backend)
        if why:
            raise ValueError(f"backend {backend!r} cannot run these inputs: " + "; ".join(why))
        return backend
    pref = preference()
    if pref is not None and pref in backends and not reasons(pref):
        return pref
    first_why = None
    for i, name in enumerate(order):
        why = reasons(name)
        if not why:
            if i > 0:
                _record(op, name, order[0], first_why)
            return name
        if i == 0:
            first_why = why
    raise RuntimeError(f"longkernels.{op}: no backend can run these inputs (last tried {order[-1]!r}: "
                       f"{'; '.join(why)})")


def preference_report(op: str, backends: Sequence[str], reasons: Callable[[str], list]) -> Optional[str]:
    """What ``LONGKERNELS_BACKEND`` does for ``op`` on an input ``reasons`` describes (None when unset)."""
    pref = preference()
    if pref is None:
        return None
    if pref not in backends:
        return f"{ENV_BACKEND}={pref!r} is not a backend of {op} ({', '.join(backends)}): ignored"
    why = reasons(pref)
    if why:
        return f"{ENV_BACKEND}={pref!r} skipped: " + "; ".join(why)
    return f"{ENV_BACKEND}={pref!r} used"


def fallbacks() -> dict:
    """``{(op, skipped backend, chosen backend, reason): calls}`` for every fallback of this process."""
    with _lock:
        return dict(_counts)


def reset_fallbacks() -> None:
    """Forget the counts and which warnings were given (tests)."""
    with _lock:
        _counts.clear()
        _warned.clear()
