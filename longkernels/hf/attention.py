"""The ``"longkernels"`` attention and mask functions for ``transformers`` (see ``longkernels.hf``).

How HF's call maps onto :func:`longkernels.memory_attention`: the key states of a layer are the cache
followed by the current tokens, so the first ``Lk - Lq`` keys are the memory and the last ``Lq`` the
segment, as views (no copy), and the causal diagonal is aligned bottom-right, as HF's masks align it. A
static cache is a zero-padded buffer: the keys in use are its first ``q_offset + Lq`` (the mask function
reports how many), the rest are never read. HF's 2-D padding mask becomes ``key_padding_mask``, packed
sequences (``position_ids`` restarting per document) become ``document_ids``, a sliding-window mask the
``window``; a bidirectional mask (encoders) is ``causal=False``.
"""
from __future__ import annotations

import collections
import dataclasses
import sys
import threading
import warnings
from typing import Any, Callable, Optional

import torch

from ..ops import memory_attention as _ma

NAME = "longkernels"


class HFFallbackWarning(UserWarning):
    """A call that the longkernels attention handed back to HF's own function (once per reason)."""


_lock = threading.Lock()
_counts: dict = {"calls": 0, "longkernels": 0, "fallbacks": collections.Counter()}
_warned: set = set()


def stats() -> dict:
    """Calls of the attention function so far: how many ran on longkernels' kernels, and the fallbacks to
    HF's own functions by reason (``{"calls": n, "longkernels": n, "fallbacks": {reason: n}}``)."""
    with _lock:
        return {"calls": _counts["calls"], "longkernels": _counts["longkernels"],
                "fallbacks": dict(_counts["fallbacks"])}


def reset_stats() -> None:
    with _lock:
        _counts["calls"] = _counts["longkernels"] = 0
        _counts["fallbacks"].clear()
        _warned.clear()


# --------------------------------------------------------------------------------------------
# The mask function: HF's mask as a compact description.
# --------------------------------------------------------------------------------------------
class _Unsupported(Exception):
    pass


@dataclasses.dataclass
class MaskInfo:
    """HF's attention mask as the kernels take it. ``reason`` is set when the mask is not one they can
    express (the attention then falls back to HF's own function with HF's own dense mask, built from
    ``hf_kwargs`` only then)."""
    causal: bool = True
    window: Optional[int] = None
    padding: Optional[torch.Tensor] = None     # (B, kv_used), True = padded
    documents: Optional[torch.Tensor] = None   # (B, kv_used), non-decreasing
    kv_used: Optional[int] = None              # the layer's first kv_used keys take part
    reason: Optional[str] = None
    hf_kwargs: dict = dataclasses.field(default_factory=dict, repr=False)

    # HF model code tells a prepared mask from a 2-D padding mask by its rank (GPT-2 reshapes anything below 4
    # dimensions, generate() rebuilds 2-D ones): this one is prepared.
    ndim = 4

    def dense(self, kind: str):
        """HF's own mask for its ``kind`` ("sdpa" or "eager") attention, from the arguments HF gave."""
        from transformers.masking_utils import AttentionMaskInterface
        return AttentionMaskInterface._global_mapping[kind](**self.hf_kwargs)


def _closure(fn) -> dict:
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}


_KNOWN: dict = {}


def _known_codes() -> dict:
    """Code objects of HF's mask building blocks, by role (those this transformers version has)."""
    if _KNOWN:
        return _KNOWN
    from transformers import masking_utils as mu
    probe = torch.zeros(1, 1, dtype=torch.long)
    makers = {
        "and": lambda: mu.and_masks(mu.causal_mask_function),
        "or": lambda: mu.or_masks(mu.causal_mask_function),
        "window": lambda: mu.sliding_window_overlay(1),
        "padding": lambda: mu.padding_mask_function(probe),
        "packed": lambda: mu.packed_sequence_mask_function(probe),
        "remap": lambda: mu.remap_positions_for_packed_sequence(mu.causal_mask_function, probe),
        "offsets": lambda: mu.add_offsets_to_mask_function(mu.causal_mask_function, 0, 0),
    }
    for role, make in makers.items():
        try:
            _KNOWN[make().__code__] = role
        except (AttributeError, TypeError):  # not in this transformers version
            pass
    _KNOWN[mu.causal_mask_function.__code__] = "causal"
    if hasattr(mu, "bidirectional_mask_function"):  # transformers 5.x
        _KNOWN[mu.bidirectional_mask_function.__code__] = "bidirectional"
    return _KNOWN


def _describe(fn) -> dict:
    """A mask function built from HF's blocks, as constraints: causal, window, documents, padding (keep)."""
    role = _known_codes().get(getattr(fn, "__code__", None))
    cells = _closure(fn)
    if role == "causal":
        return {"causal": True}
    if role == "bidirectional":
        return {}
    if role == "window":
        return {"window": int(cells["sliding_window"])}
    if role == "packed":
        return {"documents": cells["packed_sequence_mask"]}
    if role == "padding":
        return {"keep": cells["padding_mask"]}
    if role == "remap":
        # Positions restarted per packed document: inside one document (the only pairs the document mask
        # leaves) they differ from the packed positions by a constant, so causality and windows are unchanged.
        inner = _describe(cells["mask_function"])
        inner["remapped"] = True
        return inner
    if role == "and":
        out: dict = {}
        for part in cells["mask_functions"]:
            d = _describe(part)
            out["causal"] = out.get("causal", False) or d.get("causal", False)
            if "window" in d:
                out["window"] = min(out.get("window", d["window"]), d["window"])
            for key in ("documents", "keep"):
                if key in d:
                    if key in out:
                        raise _Unsupported(f"two {key} masks in one mask function")
                    out[key] = d[key]
            out["remapped"] = out.get("remapped", False) or d.get("remapped", False)
        return out
    name = getattr(fn, "__qualname__", type(fn).__name__)
    raise _Unsupported(f"the mask function {name} is not one longkernels can express (padding, documents, "
                       f"causal, sliding window)")


def mask_interface(batch_size: int, q_length: Optional[int] = None, kv_length: Optional[int] = None,
                   q_offset=0, kv_offset: int = 0, mask_function: Optional[Callable] = None,
                   attention_mask: Optional[torch.Tensor] = None, cache_position: Optional[torch.Tensor] = None,
                   **kwargs) -> MaskInfo:
    """HF's mask interface (``AttentionMaskInterface``): returns a :class:`MaskInfo`, never an ``Lq x Lk``
    tensor. Takes the arguments of transformers 5.x (``q_length``, ``q_offset``) and 4.5x
    (``cache_position``)."""
    if isinstance(attention_mask, MaskInfo):  # prepared ahead for this step (generate with a static cache)
        return attention_mask
    hf_kwargs = dict(batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, **kwargs)
    if cache_position is not None:  # transformers 4.5x
        hf_kwargs["cache_position"] = cache_position
        q_length = int(cache_position.shape[0])
        q_offset = int(cache_position[0]) if q_length else 0
    else:
        hf_kwargs.update(q_length=q_length, q_offset=q_offset)
    info = MaskInfo(hf_kwargs=hf_kwargs)
    try:
        from transformers import masking_utils as mu
        d = _describe(mask_function if mask_function is not None else mu.causal_mask_function)
    except _Unsupported as e:
        info.reason = str(e)
        return info
    q_offset = int(q_offset)
    kv_offset = int(kv_offset)
    used = q_offset + int(q_length) - kv_offset  # the last query's position, relative to the first key, + 1
    info.causal = bool(d.get("causal", False))
    info.window = d.get("window")
    if info.window is not None and not info.causal:
        info.reason = "a sliding window without causality"
        return info
    if d.get("remapped") and "documents" not in d:
        info.reason = "positions remapped without a document mask"
        return info
    info.kv_used = used if info.causal else int(kv_length)
    keep = attention_mask if attention_mask is not None else d.get("keep")
    if keep is not None:
        if keep.dim() != 2:
            info.reason = f"a {keep.dim()}-D padding mask"
            return info
        keep = keep[:, kv_offset:kv_offset + info.kv_used].to(torch.bool)
        if keep.shape[1] < info.kv_used:  # shorter than the keys (HF pads it with "keep")
            keep = torch.cat([keep, keep.new_ones(keep.shape[0], info.kv_used - keep.shape[1])], dim=1)
        if keep.shape[0] == 1 and batch_size > 1:
            keep = keep.expand(batch_size, -1)
        pad = ~keep
        info.padding = pad if bool(pad.any()) else None
    docs = d.get("documents")
    if docs is not None:
        if docs.shape[-1] != info.kv_used or q_offset != 0 or kv_offset != 0:
            info.reason = "packed documents together with a cache"
            return info
        info.documents = docs.expand(batch_size, -1) if docs.shape[0] == 1 else docs
    return info


# --------------------------------------------------------------------------------------------
# The attention function.
# --------------------------------------------------------------------------------------------
def _count(reason: Optional[str]) -> None:
    with _lock:
        _counts["calls"] += 1
        if reason is None:
            _counts["longkernels"] += 1
            return
        _counts["fallbacks"][reason] += 1
        first = reason not in _warned
        _warned.add(reason)
    if first:
        warnings.warn(f"longkernels attention: {reason}; this call runs HF's own attention instead (warned once "
                      f"per reason; longkernels.hf.stats() counts them)", HFFallbackWarning, stacklevel=3)


def _fallback(module, query, key, value, attention_mask, reason, kwargs):
    """HF's own attention for this call: the model's eager function where weights or HF-only terms are
    needed (output_attentions, softcap, sinks, dropout with them), else SDPA."""
    _count(reason)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    needs_eager = (kwargs.get("output_attentions") or kwargs.get("softcap") is not None
                   or kwargs.get("s_aux") is not None)
    if needs_eager and eager is not None:
        mask = attention_mask
        if isinstance(mask, MaskInfo):
            hf = dict(mask.hf_kwargs)
            hf.setdefault("dtype", query.dtype)
            mask = MaskInfo(hf_kwargs=hf).dense("eager")
        return eager(module, query, key, value, mask, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    mask = attention_mask.dense("sdpa") if isinstance(attention_mask, MaskInfo) else attention_mask
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


def _why_not(module, query, key, attention_mask, dropout, kwargs) -> Optional[str]:
    if kwargs.get("output_attentions"):
        return "output_attentions=True (the kernels return no attention weights)"
    if dropout and module.training:
        return "attention dropout in training (the kernels apply none)"
    if kwargs.get("position_bias") is not None:
        return "an additive position bias"
    if (attention_mask is not None and not isinstance(attention_mask, MaskInfo)
            and _padding_of_dense(attention_mask) is None):
        return "an attention mask built elsewhere than longkernels' mask function (a custom 4-D mask)"
    if isinstance(attention_mask, MaskInfo) and attention_mask.reason:
        return attention_mask.reason
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtype {query.dtype}"
    order = _ma.device_order(query.device.type)
    fast = [b for b in order if b != "reference" and not _ma.not_supported_reasons(b, query, key)]
    if not fast:
        reasons = "; ".join(r for b in order if b != "reference" for r in _ma.not_supported_reasons(b, query, key))
        return f"no longkernels kernel takes this call ({reasons})"
    return None


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Any, dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, sliding_window: Optional[int] = None,
                      softcap: Optional[float] = None, s_aux: Optional[torch.Tensor] = None, **kwargs):
    """HF's attention-function contract: returns ``(out (B, Lq, H, Dv), None)``."""
    passthrough = dict(kwargs, dropout=dropout, scaling=scaling)
    if is_causal is not None:
        passthrough["is_causal"] = is_causal
    if sliding_window is not None:
        passthrough["sliding_window"] = sliding_window
    if softcap is not None:
        passthrough["softcap"] = softcap
    if s_aux is not None:
        passthrough["s_aux"] = s_aux
    reason = _why_not(module, query, key, attention_mask, dropout, kwargs)
    if reason is None:
        result = _run(module, query, key, value, attention_mask, scaling, is_causal, sliding_window, softcap, s_aux)
        if isinstance(result, str):
            reason = result
        else:
            _count(None)
            return result, None
    return _fallback(module, query, key, value, attention_mask, reason, passthrough)


def _padding_of_dense(mask) -> Optional[torch.Tensor]:
    """A dense 4-D mask that is padding only (the same row for every query and head: an expanded
    ``(B, 1, Lq, Lk)`` tensor, as HF's older ``_prepare_4d_attention_mask`` builds for encoders) as a
    ``(B, Lk)`` key padding mask (True = padded); None for any other mask."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.stride(2) != 0:
        return None
    if mask.shape[1] != 1 and mask.stride(1) != 0:
        return None
    row = mask[:, 0, 0, :]
    return ~row if row.dtype == torch.bool else row < 0


def _run(module, query, key, value, info, scaling, is_causal, sliding_window, softcap, s_aux):
    """The kernels' call, or the reason they cannot take it."""
    Lq, Lk = query.shape[2], key.shape[2]
    dense_padding = None if isinstance(info, MaskInfo) or info is None else _padding_of_dense(info)
    if dense_padding is not None:  # an encoder's expanded padding mask
        info = MaskInfo(causal=False, padding=dense_padding if bool(dense_padding.any()) else None, kv_used=Lk)
    if isinstance(info, MaskInfo):
        causal, window, used = info.causal, info.window, info.kv_used
        padding, documents = info.padding, info.documents
    else:  # HF passed no mask (no padding, plain causal or bidirectional)
        causal = bool(is_causal) if is_causal is not None else bool(getattr(module, "is_causal", True))
        window, used, padding, documents = (sliding_window if causal else None), Lk, None, None
    if window is None and sliding_window is not None and causal and not isinstance(info, MaskInfo):
        window = sliding_window
    if used is None or used > Lk:
        return f"the mask describes {used} keys but the layer has {Lk}"
    if used < Lq:
        return f"fewer keys ({used}) than queries ({Lq})"
    if used < Lk:  # a static cache: only the first `used` slots hold keys
        key, value = key[:, :, :used], value[:, :, :used]
    M = used - Lq
    mem_k = key[:, :, :M] if M else None
    mem_v = value[:, :, :M] if M else None
    k, v = key[:, :, M:], value[:, :, M:]
    sinks = s_aux
    if sinks is not None and tuple(sinks.shape) != (query.shape[1],):
        return f"sinks of shape {tuple(sinks.shape)} (one per query head expected)"
    out = _ma.memory_attention(query, k, v, mem_k, mem_v, causal=causal, window=window, scale=scaling,
                               key_padding_mask=padding, document_ids=documents,
                               softcap=softcap if softcap else None, sinks=sinks)
    return out.transpose(1, 2)


def register() -> None:
    """Registers the attention and mask functions under ``"longkernels"`` (idempotent)."""
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers before the mask interface: HF passes its own 4-D masks
        return
    AttentionMaskInterface.register(NAME, mask_interface)
