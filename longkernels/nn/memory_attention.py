"""Drop-in Transformer-XL attention layer over :func:`longkernels.memory_attention`.

``MemoryAttention`` is a batch-first self-attention layer that carries a cache of the previous
segments' keys and values (docs/semantics.md §1) and rotates queries and keys at absolute positions
that continue across segments, so feeding a sequence segment by segment matches feeding it whole
whenever the memory covers the window (``mem_len >= window - 1``).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.memory_attention import memory_attention

__all__ = ["MemoryAttention", "MemoryCache", "RotaryEmbedding"]


def _check_int(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


# --------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------
class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021), rotate-half convention (GPT-NeoX, Llama).

    Dimension pairs ``(i, i + dim/2)`` are rotated by the angle ``pos * base ** (-2i / dim)``, so
    ``<rot(q, m), rot(k, n)>`` depends on ``m - n`` only.

    The rotation is applied in float32 (float64 for float64 inputs, so that float64 tests stay exact)
    and cast back to the input dtype. Angles are formed in float64, so large absolute positions do not
    lose phase. cos/sin tables are cached per (device, compute dtype) and grown geometrically up to
    the longest position seen, but never beyond ``max_cached_positions``: positions past that (a long
    stream through a Transformer-XL memory) are computed for the call and not kept.

    Args:
        dim: the rotated (head) dimension; must be even.
        base: the frequency base, 10000 as in RoFormer.
        max_cached_positions: the largest table kept per device and dtype.
    """

    def __init__(self, dim: int, base: float = 10000.0, *, max_cached_positions: int = 1 << 16):
        super().__init__()
        dim = _check_int("dim", dim, minimum=1)
        if dim % 2:
            raise ValueError(f"dim must be even for rotary embeddings (pairs of dimensions rotate), got {dim}")
        if isinstance(base, bool) or not isinstance(base, numbers.Real) or not base > 1 or not math.isfinite(base):
            raise ValueError(f"base must be a finite number > 1, got {base!r}")
        self.dim = dim
        self.base = float(base)
        self.max_cached_positions = _check_int("max_cached_positions", max_cached_positions, minimum=0)
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base:g}"

    @staticmethod
    def compute_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    def _compute(self, start: int, stop: int, device: torch.device, dtype: torch.dtype):
        # float64 angles; MPS has no float64, so its tables are formed on the CPU and moved.
        where = torch.device("cpu") if device.type == "mps" else device
        half = self.dim // 2
        inv_freq = self.base ** (-torch.arange(half, dtype=torch.float64, device=where) * 2.0 / self.dim)
        angles = torch.arange(start, stop, dtype=torch.float64, device=where).unsqueeze(1) * inv_freq
        angles = torch.cat([angles, angles], dim=-1)  # rotate-half: pair (i, i + dim/2) shares an angle
        return angles.cos().to(device, dtype), angles.sin().to(device, dtype)

    def cos_sin(self, offset: int, length: int, *, device=None, dtype=torch.float32):
        """``(length, dim)`` cos and sin tables for positions ``offset .. offset + length - 1``."""
        offset = _check_int("offset", offset, minimum=0)
        length = _check_int("length", length, minimum=0)
        device = torch.device("cpu") if device is None else torch.device(device)
        stop = offset + length
        if stop > self.max_cached_positions:
            return self._compute(offset, stop, device, dtype)
        key = (device, dtype)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < stop:
            have = 0 if table is None else table[0].shape[0]
            size = min(max(stop, 2 * have), self.max_cached_positions)
            table = self._compute(0, size, device, dtype)
            self._tables[key] = table
        cos, sin = table
        return cos[offset:stop], sin[offset:stop]

    def forward(self, x: torch.Tensor, offset: int = 0, *, seq_dim: int = -2,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rotates ``x`` (``..., L, ..., dim``) at positions ``offset .. offset + L - 1``, or at
        ``offset + positions`` (``(L,)`` integers, e.g. a context-parallel shard's positions) when given.

        ``seq_dim`` is the position axis: ``-2`` for ``(B, H, L, D)``, ``1`` for ``(B, L, H, D)``.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have at least 2 dimensions and last dimension {self.dim}, "
                             f"got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point, got {x.dtype}")
        s = seq_dim % x.dim()
        if s == x.dim() - 1:
            raise ValueError("seq_dim must not be the last (rotated) dimension")
        cdt = self.compute_dtype(x.dtype)
        if positions is None:
            cos, sin = self.cos_sin(offset, x.shape[s], device=x.device, dtype=cdt)
        else:
            if positions.shape != (x.shape[s],) or positions.is_floating_point():
                raise ValueError(f"positions must be ({x.shape[s]},) integers, got {tuple(positions.shape)} "
                                 f"{positions.dtype}")
            top = int(positions.max()) + 1 if positions.numel() else 0
            cos, sin = self.cos_sin(offset, top, device=x.device, dtype=cdt)
            idx = positions.to(device=x.device, dtype=torch.long)
            cos, sin = cos[idx], sin[idx]
        view = (x.shape[s],) + (1,) * (x.dim() - s - 2) + (self.dim,)
        cos, sin = cos.view(view), sin.view(view)
        xf = x.to(cdt)
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------
class MemoryCache(NamedTuple):
    """What one :class:`MemoryAttention` call hands to the next.

    Attributes:
        k: ``(B, Hkv, M, D)`` post-rotary keys of the last ``M <= mem_len`` tokens, detached.
        v: ``(B, Hkv, M, D)`` their values, detached.
        pos: absolute position of the next token (the tokens in memory sit at ``pos - M .. pos - 1``).
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: int
    # Compressive memory (cmem_len > 0): the compressed cache, attended before the memory, and what the last
    # call evicted and compressed, with that call's queries, for reconstruction_loss(). All detached.
    ck: Optional[torch.Tensor] = None
    cv: Optional[torch.Tensor] = None
    evicted_k: Optional[torch.Tensor] = None
    evicted_v: Optional[torch.Tensor] = None
    queries: Optional[torch.Tensor] = None


class MemoryAttention(nn.Module):
    """Causal self-attention with Transformer-XL segment memory, on the fused kernel.

    Batch-first, like ``nn.MultiheadAttention(batch_first=True)``: ``x`` is ``(B, L, E)``.
    Each call attends causally over ``cat(memory, current segment)`` (at most ``window`` keys per
    query, itself included, when ``window`` is set) and returns the keys and values of the last
    ``mem_len`` tokens as the next call's memory. The memory is detached: no gradient flows into
    earlier segments (Transformer-XL's stop-gradient). Rotary embeddings are applied at absolute
    positions that continue across segments (the first segment at 0, the next at L, ...), so the
    cached keys need no re-rotation.

    A sequence fed segment by segment gives the same outputs as the whole sequence fed at once with
    the same ``window`` whenever ``mem_len >= window - 1`` (or, with no window, when ``mem_len`` holds
    all earlier tokens): every key a query may see is then in memory or in its own segment.

    Dropout is applied to the output projection only, in training: the fused kernel does not
    materialise the attention probabilities, so attention-probability dropout is not supported.

    Args:
        embed_dim: model width ``E``; the head dim is ``D = E // num_heads``.
        num_heads: query heads ``H``.
        mem_len: tokens of memory kept between calls; 0 keeps none (the cache then carries only
            the position, so rotary positions still continue).
        num_kv_heads: key/value heads ``Hkv`` (grouped-query attention when ``< num_heads``);
            default ``num_heads``.
        window: each query sees at most ``window`` keys, itself included; None for all.
        bias: biases on the four projections.
        dropout: dropout probability on the output.
        rotary: apply rotary position embeddings to q and k (needs an even ``D``).
        positions: ``"rotary"`` (the default; ``rotary=False`` makes it ``"none"``), ``"relative"``
            (Transformer-XL's relative positions, fused: sinusoidal embeddings of the distances projected
            per head, a content and a position bias; ``embed_dim`` must be even), or ``"none"``.
        clamp_len: with relative positions, distances above it share its embedding.
        cmem_len: compressive memory (Rae et al. 2019): keys/values evicted from the ``mem_len`` cache are
            compressed by ``compression_rate`` into a second cache of at most ``cmem_len`` entries, attended
            before the memory in the same kernel call (0: none, evicted entries are dropped).
        compression_rate: entries per compressed entry (evictions happen in whole groups of it).
        compression: ``"mean"`` (pooling) or ``"conv"`` (a strided 1-D convolution of width
            ``compression_rate`` per head dim, for keys and values, trained by :meth:`reconstruction_loss`).
        backend: forwarded to :func:`longkernels.memory_attention`; None for the default dispatch.
        context_parallel_group: a ``torch.distributed`` process group over which each segment is sharded
            (:func:`longkernels.distributed.shard_sequence`'s zigzag layout): ``x`` is then this rank's part
            of the segment, attention runs as :func:`~longkernels.distributed.ring_attention`, rotary phases
            follow the rows' absolute positions, and the memory (the last ``mem_len`` tokens' keys and
            values) is kept whole on every rank. The outputs are this rank's rows of the unsharded layer's.
            With ``positions="relative"`` attention runs as :func:`~longkernels.distributed.ulysses_attention`
            instead (``num_heads`` divisible by the group's size); parameter gradients are each rank's part
            (sum them over the group, as data parallelism does).

    Example::

        >>> layer = longkernels.nn.MemoryAttention(512, 8, mem_len=256, window=257)
        >>> mems = None
        >>> for segment in x.split(256, dim=1):    # x: (B, T, 512)
        ...     y, mems = layer(segment, mems)      # y: (B, 256, 512)
    """

    def __init__(self, embed_dim: int, num_heads: int, *, mem_len: int, num_kv_heads: Optional[int] = None,
                 window: Optional[int] = None, bias: bool = True, dropout: float = 0.0, rotary: bool = True,
                 backend: Optional[str] = None, context_parallel_group=None, positions: Optional[str] = None,
                 clamp_len: Optional[int] = None, cmem_len: int = 0, compression_rate: Optional[int] = None,
                 compression: str = "mean", device=None, dtype=None):
        super().__init__()
        embed_dim = _check_int("embed_dim", embed_dim, minimum=1)
        num_heads = _check_int("num_heads", num_heads, minimum=1)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else _check_int("num_kv_heads", num_kv_heads, minimum=1)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        mem_len = _check_int("mem_len", mem_len, minimum=0)
        if window is not None:
            window = _check_int("window", window, minimum=1)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        if not isinstance(rotary, bool):
            raise TypeError(f"rotary must be a bool, got {type(rotary).__name__}")
        if positions is None:
            positions = "rotary" if rotary else "none"
        if positions not in ("rotary", "relative", "none"):
            raise ValueError(f"positions must be 'rotary', 'relative' or 'none', got {positions!r}")
        rotary = positions == "rotary"
        if positions == "relative" and embed_dim % 2:
            raise ValueError(f"positions='relative' needs an even embed_dim (sinusoidal embeddings), got {embed_dim}")
        if positions == "relative" and context_parallel_group is not None:
            import torch.distributed as dist
            W = dist.get_world_size(context_parallel_group)
            if num_heads % W:
                raise ValueError(f"positions='relative' on a context-parallel group runs Ulysses attention (an "
                                 f"all-to-all over heads): num_heads ({num_heads}) must be divisible by the "
                                 f"group's size ({W})")
        head_dim = embed_dim // num_heads
        if rotary and head_dim % 2:
            raise ValueError(f"rotary=True needs an even head dim, but embed_dim // num_heads = "
                             f"{embed_dim} // {num_heads} = {head_dim}")

        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.mem_len = mem_len
        self.window = window
        self.dropout = float(dropout)
        self.backend = backend
        self.context_parallel_group = context_parallel_group
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **factory)
        self.rotary = RotaryEmbedding(head_dim) if rotary else None
        self.positions = positions
        self.clamp_len = None if clamp_len is None else _check_int("clamp_len", clamp_len, minimum=0)
        if positions == "relative":  # Transformer-XL's r_net, r_w_bias (content) and r_r_bias (position)
            self.r_net = nn.Linear(embed_dim, num_heads * head_dim, bias=False, **factory)
            self.content_bias = nn.Parameter(torch.zeros(num_heads, head_dim, **factory))
            self.pos_bias = nn.Parameter(torch.zeros(num_heads, head_dim, **factory))
        self.cmem_len = _check_int("cmem_len", cmem_len, minimum=0)
        self.compression = compression
        self.compression_rate = None
        if self.cmem_len:
            if compression_rate is None:
                raise ValueError("cmem_len > 0 needs compression_rate (entries per compressed entry)")
            self.compression_rate = _check_int("compression_rate", compression_rate, minimum=1)
            if compression not in ("mean", "conv"):
                raise ValueError(f"compression must be 'mean' or 'conv', got {compression!r}")
            if context_parallel_group is not None:
                raise ValueError("compressive memory does not run on a context-parallel group yet")
            if compression == "conv":
                c = self.compression_rate
                self.compress_k = nn.Conv1d(head_dim, head_dim, c, stride=c, **factory)
                self.compress_v = nn.Conv1d(head_dim, head_dim, c, stride=c, **factory)
        self.reset_parameters()

    def compress(self, k: torch.Tensor, v: torch.Tensor):
        """``(B, Hkv, n, D)`` keys and values (``n`` a multiple of the rate) -> ``(B, Hkv, n / rate, D)`` each."""
        B, Hkv, n, D = k.shape
        c = self.compression_rate
        if self.compression == "mean":
            return k.view(B, Hkv, n // c, c, D).mean(3), v.view(B, Hkv, n // c, c, v.shape[3]).mean(3)

        def conv(net, t):
            y = net(t.reshape(B * Hkv, n, t.shape[3]).transpose(1, 2).to(net.weight.dtype))
            return y.transpose(1, 2).reshape(B, Hkv, n // c, t.shape[3]).to(t.dtype)
        return conv(self.compress_k, k), conv(self.compress_v, v)

    def reconstruction_loss(self, cache: "MemoryCache") -> Optional[torch.Tensor]:
        """The Compressive Transformer's attention-reconstruction loss for what ``cache``'s call evicted: the
        mean squared difference between that call's queries attending over the evicted keys/values and over
        their compression (content attention; gradients reach the compression only). None when nothing was
        evicted; a constant for ``compression="mean"``, which has no parameters."""
        if not self.cmem_len or cache is None or cache.evicted_k is None or cache.evicted_k.shape[2] == 0:
            return None
        q, k, v = cache.queries, cache.evicted_k, cache.evicted_v
        with torch.no_grad():
            want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        ck, cv = self.compress(k, v)
        return F.mse_loss(F.scaled_dot_product_attention(q, ck, cv, enable_gqa=True), want)

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases, as ``nn.MultiheadAttention`` initialises its projections."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.positions == "relative":
            nn.init.xavier_uniform_(self.r_net.weight)
            nn.init.zeros_(self.content_bias)
            nn.init.zeros_(self.pos_bias)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"mem_len={self.mem_len}, window={self.window}, dropout={self.dropout}, backend={self.backend}")

    def _check_input(self, x, mems):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must have shape (B, L, E={self.embed_dim}) (batch first), got shape {tuple(x.shape)}")
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"x's last dimension must be embed_dim={self.embed_dim}, got shape {tuple(x.shape)}")
        if x.shape[1] < 1:
            raise ValueError("x must hold at least one token (x.shape[1] >= 1)")
        if mems is None:
            return None
        if not isinstance(mems, tuple) or len(mems) not in (3, len(MemoryCache._fields)):
            raise TypeError(f"mems must be None or the MemoryCache returned by the previous call, "
                            f"got {type(mems).__name__}")
        mems = MemoryCache(*mems)
        B = x.shape[0]
        for name in ("k", "v"):
            t = getattr(mems, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"mems.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4 or t.shape[0] != B or t.shape[1] != self.num_kv_heads or t.shape[3] != self.head_dim:
                raise ValueError(f"mems.{name} must have shape (B={B}, Hkv={self.num_kv_heads}, M, "
                                 f"D={self.head_dim}), got {tuple(t.shape)}")
            if t.device != x.device:
                raise ValueError(f"mems.{name} must be on x's device ({x.device}), got {t.device}")
        if mems.k.shape[2] != mems.v.shape[2]:
            raise ValueError(f"mems.k and mems.v must hold the same number of tokens, got "
                             f"{mems.k.shape[2]} and {mems.v.shape[2]}")
        pos = mems.pos
        if isinstance(pos, bool) or not isinstance(pos, numbers.Integral) or pos < mems.k.shape[2]:
            raise ValueError(f"mems.pos must be an int >= the tokens in memory ({mems.k.shape[2]}), got {pos!r}")
        return mems

    def forward(self, x: torch.Tensor, mems: Optional[MemoryCache] = None, *,
                seq_len: Optional[int] = None) -> tuple[torch.Tensor, MemoryCache]:
        """Attends ``x`` over the memory and itself.

        Args:
            x: ``(B, L, E)``; with a context-parallel group, this rank's rows of the segment.
            mems: None for the first segment, else the cache returned by the previous call.
            seq_len: with a context-parallel group, the whole segment's length (found with one all-reduce
                when not given).

        Returns:
            ``(y, new_mems)``: ``y`` of shape ``(B, L, E)``, and the :class:`MemoryCache` holding the
            last ``mem_len`` tokens of ``cat(mems, x)``'s keys and values (detached) and the next position.
        """
        mems = self._check_input(x, mems)
        if self.context_parallel_group is not None:
            return self._forward_sharded(x, mems, seq_len)
        B, L, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        pos = 0 if mems is None else int(mems.pos)

        # (B, L, H, D) layout; the kernel takes the (B, H, L, D) transpose as a strided view.
        q = self.q_proj(x).view(B, L, H, D)
        k = self.k_proj(x).view(B, L, Hkv, D)
        v = self.v_proj(x).view(B, L, Hkv, D)
        if self.rotary is not None:
            q = self.rotary(q, pos, seq_dim=1)
            k = self.rotary(k, pos, seq_dim=1)

        mem_k = mem_v = None
        if mems is not None and mems.k.shape[2] > 0:
            mem_k, mem_v = mems.k.detach(), mems.v.detach()
        ck = cv = None
        if self.cmem_len and mems is not None and mems.ck is not None and mems.ck.shape[2] > 0:
            ck, cv = mems.ck.detach(), mems.cv.detach()
        att_k, att_v = mem_k, mem_v  # the kernel's memory operand: compressed memory, then memory
        if ck is not None:
            att_k = ck if mem_k is None else torch.cat([ck, mem_k], dim=2)
            att_v = cv if mem_v is None else torch.cat([cv, mem_v], dim=2)
        rel = {}
        if self.positions == "relative":
            from .relative import relative_pos_emb
            M = 0 if att_k is None else att_k.shape[2]
            n = min(self.window, M + L) if self.window else M + L
            rel = dict(pos_emb=relative_pos_emb(self.r_net, n, H, D, clamp_len=self.clamp_len),
                       content_bias=self.content_bias, pos_bias=self.pos_bias)
        o = memory_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), att_k, att_v,
                             causal=True, window=self.window, backend=self.backend, **rel)
        y = self.out_proj(o.transpose(1, 2).reshape(B, L, H * D))
        y = F.dropout(y, p=self.dropout, training=self.training)
        if self.cmem_len:
            return y, self._next_compressive_cache(mem_k, mem_v, ck, cv, k, v, q, pos + L)
        return y, self._next_cache(mem_k, mem_v, k, v, pos + L)

    def _next_compressive_cache(self, mem_k, mem_v, ck, cv, k, v, q, next_pos) -> MemoryCache:
        """The memory keeps the last tokens; whole groups of compression_rate evicted tokens are compressed
        onto the compressed cache (at most cmem_len entries), the rest stay in memory until a group fills."""
        kt, vt = k.detach().transpose(1, 2), v.detach().transpose(1, 2)
        allk = kt if mem_k is None else torch.cat([mem_k, kt], dim=2)
        allv = vt if mem_v is None else torch.cat([mem_v, vt], dim=2)
        total, c = allk.shape[2], self.compression_rate
        evict = max(0, total - self.mem_len) // c * c
        ek, ev = allk[:, :, :evict], allv[:, :, :evict]
        if evict:
            with torch.no_grad():
                nk, nv = self.compress(ek, ev)
            ck = nk if ck is None else torch.cat([ck, nk], dim=2)
            cv = nv if cv is None else torch.cat([cv, nv], dim=2)
            ck, cv = ck[:, :, max(0, ck.shape[2] - self.cmem_len):], cv[:, :, max(0, cv.shape[2] - self.cmem_len):]
        if ck is None:
            ck, cv = allk[:, :, :0], allv[:, :, :0]
        return MemoryCache(allk[:, :, evict:], allv[:, :, evict:], next_pos, ck, cv, ek, ev,
                           q.detach().transpose(1, 2))

    def _forward_sharded(self, x, mems, seq_len):
        from .. import distributed as cp

        group = self.context_parallel_group
        B, L, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if seq_len is None:
            seq_len = cp.total_length(L, group)
        pos = 0 if mems is None else int(mems.pos)
        q = self.q_proj(x).view(B, L, H, D)
        k = self.k_proj(x).view(B, L, Hkv, D)
        v = self.v_proj(x).view(B, L, Hkv, D)
        if self.rotary is not None:
            positions = cp.sequence_positions(seq_len, group)
            q = self.rotary(q, pos, seq_dim=1, positions=positions)
            k = self.rotary(k, pos, seq_dim=1, positions=positions)
        mem_k = mem_v = None
        if mems is not None and mems.k.shape[2] > 0:
            mem_k, mem_v = mems.k.detach(), mems.v.detach()
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)
        M = 0 if mem_k is None else mem_k.shape[2]
        if self.positions == "relative":  # every rank's heads over the whole sequence: the fused relative kernels
            from .relative import relative_pos_emb
            n = min(self.window, M + seq_len) if self.window else M + seq_len
            pos_emb = relative_pos_emb(self.r_net, n, H, D, clamp_len=self.clamp_len)
            o = cp.ulysses_attention(q.transpose(1, 2), kt, vt, group=group, causal=True, window=self.window,
                                     mem_k=mem_k, mem_v=mem_v, pos_emb=pos_emb, content_bias=self.content_bias,
                                     pos_bias=self.pos_bias)
        else:
            o = cp.ring_attention(q.transpose(1, 2), kt, vt, group=group, causal=True, window=self.window,
                                  mem_k=mem_k, mem_v=mem_v)
        y = self.out_proj(o.transpose(1, 2).reshape(B, L, H * D))
        y = F.dropout(y, p=self.dropout, training=self.training)
        # The next memory, whole on every rank: the segment's last tokens travel from the ranks holding them.
        keep = min(self.mem_len, M + seq_len)
        from_cur, from_mem = min(seq_len, keep), keep - min(seq_len, keep)
        ks = [cp.gather_tail(kt.detach(), from_cur, group)]
        vs = [cp.gather_tail(vt.detach(), from_cur, group)]
        if from_mem:
            ks.insert(0, mem_k[:, :, M - from_mem:])
            vs.insert(0, mem_v[:, :, M - from_mem:])
        return y, MemoryCache(torch.cat(ks, dim=2), torch.cat(vs, dim=2), pos + seq_len)

    def _next_cache(self, mem_k, mem_v, k, v, next_pos) -> MemoryCache:
        # Copy only the tokens kept, so the cache does not pin the whole cat(mem, current).
        L = k.shape[1]
        M = 0 if mem_k is None else mem_k.shape[2]
        keep = min(self.mem_len, M + L)
        from_cur = min(L, keep)
        from_mem = keep - from_cur
        ks = [k.detach()[:, L - from_cur:].transpose(1, 2)]
        vs = [v.detach()[:, L - from_cur:].transpose(1, 2)]
        if from_mem:
            ks.insert(0, mem_k[:, :, M - from_mem:])
            vs.insert(0, mem_v[:, :, M - from_mem:])
        return MemoryCache(torch.cat(ks, dim=2), torch.cat(vs, dim=2), next_pos)
