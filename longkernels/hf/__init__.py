"""Hugging Face ``transformers`` drop-in: ``attn_implementation="longkernels"`` and Reformer's LSH layers.

Importing this module registers, under the name ``"longkernels"``:

* an attention function with ``transformers.AttentionInterface``: HF's layouts as they come (query
  ``(B, H, Lq, D)``, keys and values ``(B, Hkv, Lk, D)`` not repeated for GQA), HF's ``scaling``,
  ``sliding_window``, ``softcap`` and ``s_aux`` sinks, encoders (``is_causal=False``), every cache (dynamic,
  static zero-padded buffers, sliding-window caches, one-query decode, several-query continuation);
* a mask function with ``AttentionMaskInterface`` that hands the attention a compact description of HF's mask
  (padding, packed documents, causal or not, window, how many cached keys are in use) instead of an
  ``Lq x Lk`` tensor. Without a mask function of its own HF would pass no mask at all.

Then ``from_pretrained(..., attn_implementation="longkernels")``, ``from_config(...)`` and
``model.set_attn_implementation("longkernels")`` work; :func:`enable` does whatever a model needs (Reformer's
layers included) and :func:`disable` undoes it. What the kernels cannot take falls back to HF's own ``sdpa``
or ``eager`` function, warned once per reason and counted in :func:`stats`.

``transformers`` is an optional extra (``pip install longkernels[hf]``); 4.5x and 5.x are supported.
"""
from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as exc:  # an optional extra: say which
    raise ImportError("longkernels.hf needs Hugging Face transformers (4.53 or newer): "
                      "pip install transformers, or longkernels[hf]") from exc

from .attention import (  # noqa: F401
    NAME,
    HFFallbackWarning,
    MaskInfo,
    attention_forward,
    mask_interface,
    register,
    reset_stats,
    stats,
)
from .models import disable, enable  # noqa: F401

register()

__all__ = ["NAME", "HFFallbackWarning", "MaskInfo", "attention_forward", "disable", "enable", "mask_interface",
           "register", "reset_stats", "stats"]
