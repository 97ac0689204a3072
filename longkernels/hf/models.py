"""``enable(model)`` / ``disable(model)``: what each kind of model needs to run on longkernels."""
from __future__ import annotations

import torch

from .attention import NAME

_PREVIOUS = "_longkernels_previous_attn_implementation"


def _set_implementation(model: torch.nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
        return
    # transformers before set_attn_implementation: the config field is what the layers read.
    configs = [model.config] + [m.config for m in model.modules() if hasattr(m, "config") and m.config is not model.config]
    for config in configs:
        config._attn_implementation = name


def enable(model: torch.nn.Module) -> torch.nn.Module:
    """Runs ``model``'s attention on longkernels: the ``"longkernels"`` attention implementation for models
    built on HF's attention interface, our LSH kernel under each of Reformer's ``LSHSelfAttention`` layers.
    Returns the model (changed in place); :func:`disable` restores what it had."""
    from . import reformer
    if reformer.is_reformer(model):
        reformer.patch(model)
        return model
    if not hasattr(model, "config"):
        raise TypeError(f"enable() takes a transformers PreTrainedModel, got {type(model).__name__}")
    current = getattr(model.config, "_attn_implementation", None)
    if current != NAME:
        setattr(model, _PREVIOUS, current)
    _set_implementation(model, NAME)
    return model


def disable(model: torch.nn.Module) -> torch.nn.Module:
    """Undoes :func:`enable`: the attention implementation the model had before, Reformer's own layers."""
    from . import reformer
    if reformer.is_reformer(model):
        reformer.unpatch(model)
        return model
    previous = getattr(model, _PREVIOUS, None) or "sdpa"
    _set_implementation(model, previous)
    if hasattr(model, _PREVIOUS):
        delattr(model, _PREVIOUS)
    return model
