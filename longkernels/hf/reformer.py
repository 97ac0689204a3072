"""Reformer: longkernels' LSH attention under HF's ``LSHSelfAttention`` layers.

:func:`patch` replaces each layer's ``forward`` (on the instance) with one that computes the same thing on
our kernels and keeps everything else of the layer: its weights, buffers and ``state_dict``, and its
forward contract (``attention_mask``, ``num_hashes``, ``buckets`` given, as HF's reversible backward replays
them, and returned, ``hash_seed``, factorised ``num_buckets``, the standard-attention path for sequences
no longer than a chunk). The rotations are drawn exactly as HF draws them (``torch.manual_seed(hash_seed)``
when it is set, then one ``torch.randn`` of HF's shape and dtype), so a patched model gives HF's logits in
eval and, under the same torch seed, in training, and HF's own reversible layers get the same gradients.
Incremental decoding (``past_buckets_states``), ``output_attentions`` and attention dropout in training run
HF's own forward (counted in ``longkernels.hf.stats()``).
"""
from __future__ import annotations

import types

import torch

from ..ops import lsh_attention as _lsh
from ..reference.lsh_attention import bucket_factors, padded_length, rotation_columns
from .attention import _count

_FLAG = "_longkernels_lsh_forward"


def is_reformer(model: torch.nn.Module) -> bool:
    return any(type(m).__name__ == "LSHSelfAttention" and hasattr(m, "query_key") for m in model.modules())


def _layers(model):
    return [m for m in model.modules() if type(m).__name__ == "LSHSelfAttention" and hasattr(m, "query_key")]


def patch(model: torch.nn.Module) -> None:
    for layer in _layers(model):
        if not getattr(layer, _FLAG, False):
            layer.forward = types.MethodType(_forward, layer)
            setattr(layer, _FLAG, True)


def unpatch(model: torch.nn.Module) -> None:
    for layer in _layers(model):
        if getattr(layer, _FLAG, False):
            del layer.forward  # the class's own forward again
            delattr(layer, _FLAG)


def _why_not(layer, past_buckets_states, output_attentions) -> str | None:
    # HF's own test for a cache in use (an empty one is filled after the layer, from the buckets returned).
    if past_buckets_states is not None and len(past_buckets_states) > layer.layer_idx:
        return "Reformer incremental decoding (past_buckets_states)"
    if output_attentions:
        return "output_attentions=True (the kernels return no attention weights)"
    if layer.training and layer.dropout > 0:
        return "Reformer attention-probability dropout in training (the kernels apply none)"
    return None


def _forward(self, hidden_states, attention_mask=None, num_hashes=None, buckets=None, past_buckets_states=None,
             use_cache=False, output_attentions=False, **kwargs):
    cls = type(self)
    reason = _why_not(self, past_buckets_states, output_attentions)
    if reason is not None:
        _count(reason)
        return cls.forward(self, hidden_states, attention_mask=attention_mask, num_hashes=num_hashes,
                           buckets=buckets, past_buckets_states=past_buckets_states, use_cache=use_cache,
                           output_attentions=output_attentions, **kwargs)
    from transformers.models.reformer.modeling_reformer import LSHSelfAttentionOutput

    B, L = hidden_states.shape[:2]
    H, D = self.num_attention_heads, self.attention_head_size
    num_hashes = num_hashes if num_hashes is not None else self.num_hashes
    # (B, L, H * D) -> (B, H, L, D) views: the kernels read strides.
    qk = self.query_key(hidden_states).view(B, L, H, D).transpose(1, 2)
    v = self.value(hidden_states).view(B, L, H, D).transpose(1, 2)
    pad = None
    if attention_mask is not None:
        keep = attention_mask.to(torch.bool)
        pad = None if bool(keep.all()) else ~keep  # HF adds the padding bucket only when some token is padding
    causal = bool(self.is_decoder)

    if L <= self.chunk_length:
        # HF's standard attention (no hashing, no RNG): one chunk of everything, every token one bucket.
        rotations = qk.new_zeros(H, D, 1, 1, dtype=torch.float32)
        out = _lsh.lsh_attention(qk, v, n_hashes=1, chunk_size=L, n_buckets=2, causal=causal, rotations=rotations,
                                 n_chunks_before=0, n_chunks_after=0, key_padding_mask=pad)
        _count(None)
        return LSHSelfAttentionOutput(hidden_states=out.transpose(1, 2).reshape(B, L, H * D), attention_probs=(),
                                      buckets=buckets)

    if self.num_buckets is None:
        self._set_num_buckets(L)  # HF's choice (factorised at long lengths), saved in the config as HF does
    n_buckets = self.num_buckets
    factors = bucket_factors(n_buckets)
    total = 1
    for f in factors:
        total *= f
    extra = 1 if pad is not None else 0  # HF's padding bucket, and its offsets between rounds
    common = dict(n_hashes=num_hashes, chunk_size=self.chunk_length,
                  n_buckets=factors[0] if len(factors) == 1 else list(factors), causal=causal,
                  n_chunks_before=self.num_chunks_before, n_chunks_after=self.num_chunks_after, key_padding_mask=pad)
    if buckets is None:
        # HF's draw: the seed if the config has one, then one randn of HF's shape and dtype.
        if self.hash_seed is not None:
            torch.manual_seed(self.hash_seed)
        rotations = torch.randn((H, D, num_hashes, rotation_columns(n_buckets)), device=qk.device, dtype=qk.dtype)
        out, ours = _with_buckets(qk, v, rotations.float(), common)
        offsets = torch.arange(num_hashes, device=qk.device).view(1, 1, -1, 1) * (total + extra)
        buckets = ours[..., :L].long() + offsets  # HF's form: (B, H, num_hashes, L) with the rounds' offsets
    else:
        # HF's reversible backward replays the forward's buckets: sort them, attend, no hashing.
        given = buckets.view(B, H, num_hashes, L)
        out = _from_buckets(qk, v, given, common)
    _count(None)
    return LSHSelfAttentionOutput(hidden_states=out.transpose(1, 2).reshape(B, L, H * D), attention_probs=(),
                                  buckets=buckets.view(B, H, num_hashes, -1))


def _with_buckets(qk, v, rotations, common):
    """Our attention on these rotations, and the buckets it hashed (B, H, num_hashes, Lp) int32."""
    n_hashes, chunk = common["n_hashes"], common["chunk_size"]
    L = qk.shape[2]
    n_hashes, chunk_size, n_buckets, before, after, scale = _lsh.validate(
        qk, v, n_hashes, chunk, common["n_buckets"], common["causal"], rotations, common["n_chunks_before"],
        common["n_chunks_after"], common["key_padding_mask"], 1.0)
    buckets, perm = _lsh.hash_sort(qk, rotations, common["key_padding_mask"], n_buckets,
                                   padded_length(L, chunk_size))
    out = _attend(qk, v, perm, common, chunk_size, before, after)
    return out, buckets


def _from_buckets(qk, v, given, common):
    """Our attention on the order of HF's buckets (stable, by bucket then position, per round)."""
    L = qk.shape[2]
    chunk = min(common["chunk_size"], L)
    Lp = padded_length(L, chunk)
    if Lp != L:  # HF's LSH layers see whole chunks (its model pads the input); keep HF's own path otherwise
        raise ValueError(f"Reformer LSH attention with buckets given needs L ({L}) to be a multiple of the chunk "
                         f"length ({chunk}), as HF's model pads it")
    perm = torch.sort(given, dim=-1, stable=True).indices.to(torch.int32)
    return _attend(qk, v, perm, common, chunk, common["n_chunks_before"], common["n_chunks_after"])


def _attend(qk, v, perm, common, chunk_size, before, after):
    backend = _lsh.choose_backend(qk, v, None)
    if backend == "reference":
        raise RuntimeError("longkernels' LSH kernels are not available here (see longkernels info)")
    return _lsh.LSHAttentionFromOrder.apply(qk, v, perm, common["key_padding_mask"], chunk_size, before, after,
                                            common["causal"], 1.0, backend)
