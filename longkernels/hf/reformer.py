"""Reformer: longkernels' LSH attention under HF's ``LSHSelfAttention`` layers (weights, buffers, state_dict and
forward contract kept)."""
from __future__ import annotations

import torch


def is_reformer(model: torch.nn.Module) -> bool:
    return type(model).__name__.startswith("Reformer") or any(
        type(m).__name__ == "LSHSelfAttention" for m in model.modules())


def patch(model: torch.nn.Module) -> None:
    raise NotImplementedError("longkernels.hf.enable on Reformer models is not implemented yet")


def unpatch(model: torch.nn.Module) -> None:
    raise NotImplementedError("longkernels.hf.disable on Reformer models is not implemented yet")
