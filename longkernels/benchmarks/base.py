"""What the benchmark engine knows of an operation: its cases, its implementations, its sweeps.

An operation (``Operation``) is a function making cases plus the implementations that can run them; the
engine (``engine.py``) knows nothing else about it, so a new capability adds a module beside this one and
an entry in ``OPERATIONS`` (``__init__.py``) and changes nothing in the engine.

What the engine relies on:

* a case has ``op``, ``mode`` (``"fwd"`` or ``"fwdbwd"``), ``dtype``, ``variant``, ``sweep`` (the x of the
  curves) and ``sweep_name``, ``id``, ``shape``, ``flops()`` (useful FLOPs, docs/performance.md; None where
  only time is reported) and ``make_inputs(device, seed)`` (a dict of fresh random tensors, the
  differentiable ones requiring grad when ``mode == "fwdbwd"``);
* an implementation has ``name``, ``peer`` (longkernels is compared against it), ``reasons(case, device)``
  (why it cannot run; empty when it can) and ``build(case, device)``, which does the untimed per-shape
  setup (masks, compilation, modules) and returns ``fn(**inputs) -> Tensor`` (or a tuple of tensors; a
  ``zero_grad`` attribute on ``fn`` is called between steps, for implementations holding parameters), and
  ``comparable`` (False: computes another function on purpose, e.g. dense attention beside LSH attention,
  and is not checked against the reference).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Optional, Sequence

import torch

MODES = ("fwd", "fwdbwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
# FlashAttention's convention (docs/performance.md): backward costs about 2.5 forwards.
FWDBWD_FACTOR = 3.5
LEVELS = ("quick", "default", "full")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Implementation:
    name: str = "?"
    peer: bool = True
    note: str = ""
    # False: computes something else on purpose (dense attention as a peer of LSH attention); the engine
    # does not check its output against the reference.
    comparable: bool = True
    # Per-dtype tolerances of the engine's agreement check that this implementation widens (documented
    # where set); the engine's AGREE_TOL otherwise.
    agree_tol: ClassVar[dict] = {}

    def reasons(self, case, device: torch.device) -> list[str]:
        return []

    def build(self, case, device: torch.device) -> Callable:
        raise NotImplementedError


def module_fn(forward, module: torch.nn.Module, case) -> Callable:
    """``forward`` as an implementation's step function; the engine clears ``module``'s parameter grads."""
    module.requires_grad_(case.mode == "fwdbwd")  # forward-only cases build no autograd graph

    def fn(**inputs):
        return forward(**inputs)
    fn.zero_grad = module.zero_grad
    return fn


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What one level of a run measures: sizes of the sweep, dtypes, modes and variants (None: all)."""
    sizes: tuple
    dtypes: tuple = ("float32", "bfloat16")
    modes: tuple = MODES
    variants: Optional[tuple] = None
    extra: dict = dataclasses.field(default_factory=dict)  # keyword arguments of the operation's make_cases


@dataclasses.dataclass(frozen=True)
class Operation:
    name: str
    make_cases: Callable[[Sequence[int], Sequence[torch.dtype], Sequence[str], Sequence[str]], list]
    implementations: tuple
    variants: tuple
    # "quick" (a smoke run of seconds), "default" (`longkernels bench`, `make bench`: representative, minutes)
    # and "full" (`--full`, `make bench-full`: the whole sweep); cuda_sweeps override some on a GPU.
    sweeps: dict
    cuda_sweeps: dict = dataclasses.field(default_factory=dict)
    modes: tuple = MODES
    flops_note: str = ("attention: 4*D per visible query-key pair and head (fwd), fwd+bwd = 3.5x fwd "
                       "(docs/performance.md)")
    # (records, device) -> dict of derived figures (ratios, targets, extra measurements) for the report
    summarize: Optional[Callable] = None
    # Plot bytes saved for backward beside the time (what a memory-saving method is about).
    plot_saved_bytes: bool = False
    # Not in a run of every operation (whole models: long); runs when named in --ops or by its --variants.
    opt_in: bool = False


def select_cases(op: Operation, *, level: str = "default", sizes: Optional[Sequence[int]] = None,
                 dtypes: Optional[Sequence[str]] = None, modes: Optional[Sequence[str]] = None,
                 variants: Optional[Sequence[str]] = None, device: Optional[torch.device] = None) -> list:
    """The cases of ``op`` at ``level``, with any of its fields replaced by the caller's."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {LEVELS}")
    on_cuda = device is not None and torch.device(device).type == "cuda"
    sweep = (op.cuda_sweeps.get(level) if on_cuda else None) or op.sweeps[level]
    sizes = tuple(sizes) if sizes else sweep.sizes
    unknown_dtypes = [d for d in (dtypes or ()) if d not in DTYPES]
    if unknown_dtypes:
        raise ValueError(f"unknown dtypes {unknown_dtypes}; known: {list(DTYPES)}")
    dtype_list = [DTYPES[d] for d in (dtypes or sweep.dtypes)]
    modes = tuple(m for m in (modes or sweep.modes) if m in op.modes) if not modes else tuple(modes)
    variants = tuple(variants or sweep.variants or op.variants)
    unknown = [m for m in modes if m not in op.modes] + [v for v in variants if v not in op.variants]
    if unknown:
        raise ValueError(f"unknown modes/variants for {op.name}: {unknown}; "
                         f"modes: {op.modes}, variants: {op.variants}")
    return op.make_cases(sizes, dtype_list, modes, variants, **sweep.extra)
