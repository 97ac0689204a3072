"""How the launchers pick their tiles on a GPU: autotuned (the default), or the first config that fits.

``LONGKERNELS_TRITON_AUTOTUNE=0`` (read per launch) replaces autotuning with the first config of the
kernel's list that compiles within the GPU's resources (after the same pruning), with no timing runs. Each
autotuned launch signature compiles every config (4 to 6; a float32 kernel with IEEE dot products takes tens
of seconds to compile) and times them: what a long training run amortises, but what makes a test suite of
hundreds of shapes spend its time compiling. ``make gpu-check`` runs the GPU tests and ``longkernels check``
with it off, and its benchmark too unless ``GPU_CHECK_AUTOTUNE=1`` (the JSON records which); elsewhere it
is on.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch

ENV_AUTOTUNE = "LONGKERNELS_TRITON_AUTOTUNE"

# Compile options every GPU launch of the package passes. Floating-point contraction (a * b + c as one FMA,
# what Triton has always done by default) stated, not inherited: Triton 3.9 warns on each first compile that
# leaves it unset, and its default is announced to become off in 3.10, which would change every kernel's
# code (the softmax's scale-and-subtract, the exp2 argument, the rescaling of the accumulators).
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def dot_precision(dtype) -> str:
    """``input_precision`` of the kernels' dot products for inputs of ``dtype``: float32 multiplies in IEEE
    float32 unless torch lets float32 matrix products use TF32 (``torch.backends.cuda.matmul.fp32_precision =
    "tf32"``, or ``torch.set_float32_matmul_precision("high" | "medium")``), as ``torch.matmul`` and
    FlexAttention do; float64 (the interpreter only) stays exact; bfloat16/float16 multiply as stored (the
    value is ignored there)."""
    if dtype == torch.float64:
        return "ieee"
    if dtype != torch.float32:
        return "tf32"
    setting = torch.backends.cuda.matmul.fp32_precision
    if setting != "none":  # the per-backend setting; the legacy global one only when it is unset
        return "tf32" if setting == "tf32" else "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def autotune_enabled() -> bool:
    return os.environ.get(ENV_AUTOTUNE, "1").strip().lower() not in ("0", "false", "no", "off")


def launch_first_fitting(kernel, grid, args, meta: dict, configs: Sequence,
                         prune: Optional[Callable] = None, derived: Optional[Callable[[dict], dict]] = None) -> dict:
    """Launches ``kernel`` with the first of ``configs`` (after ``prune(configs, {}, **meta)``) that the GPU
    can run; ``derived(config kwargs)`` adds constexprs computed from the config (a heuristic's). A config
    out of shared memory or registers is skipped, as the autotuner skips it. Returns the config's kwargs."""
    from triton.runtime.errors import OutOfResources

    kept = list(prune(configs, {}, **meta)) if prune is not None else list(configs)
    last = None
    for config in kept:
        extra = dict(config.kwargs)
        if derived is not None:
            extra.update(derived(extra))
        try:
            kernel[grid](*args, **meta, **extra, num_warps=config.num_warps, num_stages=config.num_stages,
                         **LAUNCH_OPTIONS)
            return dict(extra, num_warps=config.num_warps, num_stages=config.num_stages)
        except OutOfResources as exc:
            last = exc
    raise last if last is not None else ValueError("no config to launch with")
