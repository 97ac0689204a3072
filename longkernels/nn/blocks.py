"""Long-context blocks and a language model built from all three capabilities.

    >>> block = longkernels.nn.ReformerBlock(512, 8, attention="lsh", chunk_size=64, n_hashes=2)
    >>> model = longkernels.nn.LongContextLM(256, 512, depth=6, num_heads=8, attention="memory",
    ...                                      mem_len=512, ff_chunks=4)
    >>> mems = None
    >>> for segment in tokens.split(512, dim=1):          # tokens: (B, T) int64
    ...     logits, mems = model(segment, mems)            # logits: (B, 512, 256)

A :class:`ReformerBlock` is a :class:`~longkernels.ReversibleBlock` whose F is pre-norm attention
(:class:`LSHSelfAttention` or :class:`MemoryAttention`) and whose G is a pre-norm
:class:`ChunkedFeedForward`; :class:`LongContextLM` stacks them in a
:class:`~longkernels.ReversibleSequence` (activation memory independent of depth) between a token
embedding and a head tied to it. With memory attention, each block's F returns its layer's new
key/value cache as a side output of the stack, which the model returns as the next segment's memory
(Transformer-XL); with LSH attention the model attends within the segment only.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from ..reversible import ReversibleBlock, ReversibleSequence
from .feedforward import ChunkedFeedForward
from .lsh_attention import LSHSelfAttention
from .memory_attention import MemoryAttention, MemoryCache, _check_int

__all__ = ["LMOutput", "LongContextLM", "PreNorm", "ReformerBlock"]

ATTENTIONS = ("lsh", "memory")


class PreNorm(nn.Module):
    """``fn(LayerNorm(x), **kwargs)``: the pre-norm residual branch. ``fn``'s output (or ``(output,
    side)``) is returned as it is."""

    def __init__(self, dim: int, fn: nn.Module, *, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, device=device, dtype=dtype)
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs):
        return self.fn(self.norm(x), **kwargs)


def _check_prob(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


class ReformerBlock(ReversibleBlock):
    """Reversible block: ``y1 = x1 + Attention(LayerNorm(x2))``, ``y2 = x2 + FeedForward(LayerNorm(y1))``.

    Args:
        dim: model width.
        num_heads: attention heads.
        attention: ``"lsh"`` (:class:`LSHSelfAttention`, causal by default), ``"memory"``
            (:class:`MemoryAttention`, always causal, with a key/value memory of ``mem_len`` tokens),
            or any module mapping ``(B, L, dim)`` to the same shape (or to ``(out, side)``).
        ff_hidden: hidden width of the feed-forward; default ``4 * dim``.
        ff_chunks: sequence chunks of the feed-forward (its hidden activation never exists whole).
        activation: of the feed-forward.
        dropout: on the attention output and the feed-forward's hidden activation.
        norm_eps: of both LayerNorms.
        causal: LSH attention only (memory attention is causal).
        chunk_size, n_hashes, n_buckets, lsh_seed: LSH attention only (``lsh_seed``: its ``seed``).
        mem_len, window, num_kv_heads, rotary, positions, clamp_len, cmem_len, compression_rate, compression,
            context_parallel_group: memory attention only (:class:`MemoryAttention`'s arguments).
        backend: forwarded to the attention op.

    Extra arguments of F (``f_kwargs`` of the stack): ``key_padding_mask`` for LSH attention,
    ``mems`` (the block's :class:`MemoryCache`) for memory attention. With memory attention F returns
    ``(out, new_mems)``.
    """

    def __init__(self, dim: int, num_heads: int, *, attention: Union[str, nn.Module] = "lsh",
                 ff_hidden: Optional[int] = None, ff_chunks: int = 1, activation="gelu", dropout: float = 0.0,
                 norm_eps: float = 1e-5, causal: bool = True, chunk_size: int = 64, n_hashes: int = 2,
                 n_buckets: Optional[int] = None, lsh_seed: Optional[int] = None, mem_len: int = 0,
                 window: Optional[int] = None, num_kv_heads: Optional[int] = None, rotary: bool = True,
                 backend: Optional[str] = None, context_parallel_group=None, positions: Optional[str] = None,
                 clamp_len: Optional[int] = None, cmem_len: int = 0, compression_rate: Optional[int] = None,
                 compression: str = "mean", device=None, dtype=None):
        dim = _check_int("dim", dim, minimum=1)
        num_heads = _check_int("num_heads", num_heads, minimum=1)
        ff_hidden = 4 * dim if ff_hidden is None else _check_int("ff_hidden", ff_hidden, minimum=1)
        dropout = _check_prob("dropout", dropout)
        factory = {"device": device, "dtype": dtype}
        if isinstance(attention, nn.Module):
            attn, kind = attention, "custom"
        elif attention == "lsh":
            attn, kind = LSHSelfAttention(dim, num_heads, chunk_size=chunk_size, n_hashes=n_hashes,
                                          n_buckets=n_buckets, causal=causal, dropout=dropout, seed=lsh_seed,
                                          backend=backend, **factory), "lsh"
        elif attention == "memory":
            attn, kind = MemoryAttention(dim, num_heads, mem_len=mem_len, num_kv_heads=num_kv_heads, window=window,
                                         dropout=dropout, rotary=rotary, backend=backend,
                                         context_parallel_group=context_parallel_group, positions=positions,
                                         clamp_len=clamp_len, cmem_len=cmem_len, compression_rate=compression_rate,
                                         compression=compression, **factory), "memory"
        else:
            raise ValueError(f"attention must be one of {ATTENTIONS} or an nn.Module, got {attention!r}")
        if context_parallel_group is not None and kind != "memory":
            raise ValueError("context_parallel_group needs attention='memory' (ring attention)")
        ff = ChunkedFeedForward(dim, ff_hidden, ff_chunks, activation=activation, dropout=dropout, **factory)
        super().__init__(PreNorm(dim, attn, eps=norm_eps, **factory), PreNorm(dim, ff, eps=norm_eps, **factory))
        self.dim = dim
        self.kind = kind

    @property
    def attention(self) -> nn.Module:
        return self.f.fn

    @property
    def feed_forward(self) -> ChunkedFeedForward:
        return self.g.fn

    def extra_repr(self) -> str:
        return f"dim={self.dim}, attention={self.kind}"


class LMOutput(NamedTuple):
    """``logits``: ``(B, L, vocab_size)``; ``mems``: one :class:`MemoryCache` per block for the next
    segment (memory attention), else None."""

    logits: torch.Tensor
    mems: Optional[list[MemoryCache]]


class LongContextLM(nn.Module):
    """Causal language model: token embedding, a :class:`~longkernels.ReversibleSequence` of
    :class:`ReformerBlock`, a final LayerNorm and a head tied to the embedding.

    ``forward(tokens, mems=None, *, key_padding_mask=None) -> LMOutput(logits, mems)``.
    With ``attention="memory"`` the model is a Transformer-XL: pass the ``mems`` it returned for
    one segment with the next segment (None for the first); each block attends over its cached
    keys/values (stop-gradient) and its own segment, at rotary positions that continue across
    segments. With ``attention="lsh"`` each call is self-contained (``mems`` must be None) and
    ``key_padding_mask`` ``(B, L)`` (True: padding) reaches every block's attention.

    Args:
        vocab_size: tokens are ints in ``[0, vocab_size)``.
        dim, depth, num_heads: width, number of blocks, heads.
        attention: ``"memory"`` or ``"lsh"``.
        reversible: False runs the same blocks as a plain sequence (stores activations; the reference).
        stream_dtype: dtype of the reversible residual streams (e.g. float32 around a bfloat16 model).
        fixed_point: keep the streams on a fixed-point grid, for bit-exact reconstruction
            (:class:`~longkernels.ReversibleSequence`).
        tie_weights: the head shares the embedding matrix (default).
        dropout: on the embedding and inside each block.
        context_parallel_group: a ``torch.distributed`` process group over which every segment is sharded
            (memory attention only): ``tokens`` is then this rank's part of the segment
            (:func:`longkernels.distributed.shard_sequence` along dim 1), the logits its rows of the unsharded
            model's, and each block runs ring attention (see :class:`MemoryAttention`).
        **block_kwargs: the rest of :class:`ReformerBlock`'s arguments (``mem_len``, ``window``,
            ``chunk_size``, ``n_hashes``, ``ff_hidden``, ``ff_chunks``, ...).
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, num_heads: int, *, attention: str = "memory",
                 reversible: bool = True, stream_dtype: Optional[torch.dtype] = None, fixed_point=False,
                 tie_weights: bool = True, dropout: float = 0.0, context_parallel_group=None, device=None,
                 dtype=None, **block_kwargs):
        super().__init__()
        self.vocab_size = _check_int("vocab_size", vocab_size, minimum=1)
        dim = _check_int("dim", dim, minimum=1)
        depth = _check_int("depth", depth, minimum=1)
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if not isinstance(tie_weights, bool):
            raise TypeError(f"tie_weights must be a bool, got {type(tie_weights).__name__}")
        self.dim, self.depth, self.attention = dim, depth, attention
        self.context_parallel_group = context_parallel_group
        if context_parallel_group is not None:
            block_kwargs["context_parallel_group"] = context_parallel_group
        self.dropout = _check_prob("dropout", dropout)
        factory = {"device": device, "dtype": dtype}
        self.embed = nn.Embedding(vocab_size, dim, **factory)
        self.layers = ReversibleSequence(
            [ReformerBlock(dim, num_heads, attention=attention, dropout=dropout, **factory, **block_kwargs)
             for _ in range(depth)], reversible=reversible, stream_dtype=stream_dtype, fixed_point=fixed_point)
        self.norm = nn.LayerNorm(dim, eps=block_kwargs.get("norm_eps", 1e-5), **factory)
        self.head = nn.Linear(dim, vocab_size, bias=False, **factory)
        nn.init.normal_(self.embed.weight, std=dim ** -0.5)
        if tie_weights:
            self.head.weight = self.embed.weight

    def reconstruction_loss(self, mems) -> Optional[torch.Tensor]:
        """With compressive memory (``cmem_len``): the sum over blocks of the attention-reconstruction loss
        (:meth:`MemoryAttention.reconstruction_loss`) of what the call that returned ``mems`` evicted, for the
        training loop to add to its loss; None when nothing was evicted."""
        if self.attention != "memory" or mems is None:
            return None
        losses = [blk.attention.reconstruction_loss(m) for blk, m in zip(self.layers.blocks, mems)]
        losses = [x for x in losses if x is not None]
        return torch.stack(losses).sum() if losses else None

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, dim={self.dim}, depth={self.depth}, attention={self.attention}, "
                f"tied={self.head.weight is self.embed.weight}")

    def _check(self, tokens, mems, key_padding_mask):
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be an int64 or int32 tensor, got {tokens.dtype}")
        if tokens.dim() != 2 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must have shape (B, L) with L >= 1, got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"tokens must lie in [0, vocab_size={self.vocab_size}), got values in "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        if self.attention == "lsh":
            if mems is not None:
                raise ValueError("mems must be None with attention='lsh' (LSH attention keeps no memory)")
            return None
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask is supported with attention='lsh' only (memory attention is "
                             "causal over whole segments)")
        if mems is None:
            return None
        if not isinstance(mems, (list, tuple)) or len(mems) != self.depth:
            raise ValueError(f"mems must be None or the list of {self.depth} MemoryCache (one per block) "
                             f"returned by the previous call, got {type(mems).__name__} of length "
                             f"{len(mems) if isinstance(mems, (list, tuple)) else '-'}")
        return list(mems)

    def forward(self, tokens: torch.Tensor, mems: Optional[Sequence[MemoryCache]] = None, *,
                key_padding_mask: Optional[torch.Tensor] = None) -> LMOutput:
        mems = self._check(tokens, mems, key_padding_mask)
        x = nn.functional.dropout(self.embed(tokens), p=self.dropout, training=self.training)
        if self.attention == "memory":
            f_kwargs = None if mems is None else [{"mems": m} for m in mems]
            if self.context_parallel_group is not None:  # the whole segment's length, found once for every block
                from ..distributed import total_length
                T = total_length(tokens.shape[1], self.context_parallel_group)
                f_kwargs = [{**kw, "seq_len": T} for kw in (f_kwargs or [{}] * self.depth)]
            h, new_mems = self.layers(x, f_kwargs=f_kwargs)
        else:
            f_kwargs = None if key_padding_mask is None else {"key_padding_mask": key_padding_mask}
            h, new_mems = self.layers(x, f_kwargs=f_kwargs), None
        return LMOutput(self.head(self.norm(h)), new_mems)
