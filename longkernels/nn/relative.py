"""Transformer-XL's relative multi-head attention (Dai et al. 2019) on the fused relative-position kernels.

:class:`RelativeMemoryAttention` is a drop-in for Transformer-XL's ``RelPartialLearnableMultiHeadAttn``
layer: a joint q/k/v projection of ``cat(mems, x)`` (the memory is the previous segments' hidden states,
detached, re-projected with the current weights), sinusoidal embeddings of the distances projected per head
(``r_net``), the two learned biases ``r_w_bias`` (content) and ``r_r_bias`` (position), the output projection,
and the residual with a LayerNorm before (``pre_norm``) or after. The attention itself is one call of
:func:`longkernels.memory_attention` with ``pos_emb``: no ``N x (M + N)`` position-score matrix and no
shift in memory. ``same_length`` is Transformer-XL's option that every query sees the same number of keys
(``mem_len``): a window of ``mem_len``. Attention-probability dropout is not supported (the kernel does not
materialise the probabilities); ``dropout`` applies to the position embeddings and the output, as there.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.memory_attention import memory_attention
from .memory_attention import _check_int


def sinusoid_positions(n: int, dim: int, *, clamp_len: Optional[int] = None, device=None,
                       dtype=torch.float32) -> torch.Tensor:
    """``(n, dim)`` embeddings of the distances ``0 .. n - 1`` (Transformer-XL's: ``[sin | cos]`` of
    ``d / 10000^(2i / dim)``), distances above ``clamp_len`` clamped to it. Formed in float64."""
    if dim % 2:
        raise ValueError(f"dim must be even for sinusoidal embeddings, got {dim}")
    d = torch.arange(n, dtype=torch.float64, device=device)
    if clamp_len is not None:
        d = d.clamp(max=clamp_len)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
    angles = d.unsqueeze(1) * inv_freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)


class HiddenCache(NamedTuple):
    """What one :class:`RelativeMemoryAttention` call hands to the next: ``h`` ``(B, M, E)``, the last
    ``M <= mem_len`` hidden states it saw (detached), as Transformer-XL keeps them."""

    h: torch.Tensor


def relative_pos_emb(r_net: nn.Linear, n: int, num_heads: int, head_dim: int, *, clamp_len=None,
                     dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """``(H, n, D)`` per-head projected embeddings of the distances ``0 .. n - 1``, as the kernels take them."""
    w = r_net.weight
    emb = sinusoid_positions(n, r_net.in_features, clamp_len=clamp_len, device=w.device, dtype=w.dtype)
    emb = F.dropout(emb, p=dropout, training=training)
    return r_net(emb).view(n, num_heads, head_dim).transpose(0, 1)


class RelativeMemoryAttention(nn.Module):
    """Transformer-XL's relative-position attention layer (``RelPartialLearnableMultiHeadAttn``), fused.

    ``forward(x, mems=None) -> (y, new_mems)``, batch first: ``x`` ``(B, L, E)``, ``y`` ``(B, L, E)`` (the
    residual and LayerNorm included), ``new_mems`` a :class:`HiddenCache` of the last ``mem_len`` rows of
    ``cat(mems.h, x)``.

    Args:
        embed_dim: model width ``E``.
        num_heads: heads ``H``.
        head_dim: per-head width ``D`` (default ``E // H``).
        mem_len: hidden states kept for the next segment.
        clamp_len: distances above it share its embedding (default: none).
        same_length: every query sees ``mem_len`` keys (a window of ``mem_len``).
        pre_norm: LayerNorm on the input (``y = x + attn(LN(x))``); else after the residual
            (``y = LN(x + attn(x))``), Transformer-XL's default.
        dropout: on the position embeddings and the output.
        backend: forwarded to :func:`longkernels.memory_attention`.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, mem_len: int, head_dim: Optional[int] = None,
                 clamp_len: Optional[int] = None, same_length: bool = False, pre_norm: bool = False,
                 dropout: float = 0.0, norm_eps: float = 1e-5, backend: Optional[str] = None, device=None,
                 dtype=None):
        super().__init__()
        embed_dim = _check_int("embed_dim", embed_dim, minimum=1)
        num_heads = _check_int("num_heads", num_heads, minimum=1)
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}), or "
                                 "give head_dim")
            head_dim = embed_dim // num_heads
        head_dim = _check_int("head_dim", head_dim, minimum=1)
        if embed_dim % 2:
            raise ValueError(f"embed_dim must be even (sinusoidal position embeddings), got {embed_dim}")
        self.mem_len = _check_int("mem_len", mem_len, minimum=0)
        self.clamp_len = None if clamp_len is None else _check_int("clamp_len", clamp_len, minimum=0)
        for name, val in (("same_length", same_length), ("pre_norm", pre_norm)):
            if not isinstance(val, bool):
                raise TypeError(f"{name} must be a bool, got {type(val).__name__}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.same_length, self.pre_norm, self.dropout, self.backend = same_length, pre_norm, float(dropout), backend
        f = {"device": device, "dtype": dtype}
        self.qkv_net = nn.Linear(embed_dim, 3 * num_heads * head_dim, bias=False, **f)
        self.r_net = nn.Linear(embed_dim, num_heads * head_dim, bias=False, **f)
        self.o_net = nn.Linear(num_heads * head_dim, embed_dim, bias=False, **f)
        self.r_w_bias = nn.Parameter(torch.zeros(num_heads, head_dim, **f))  # content bias u
        self.r_r_bias = nn.Parameter(torch.zeros(num_heads, head_dim, **f))  # position bias v
        self.layer_norm = nn.LayerNorm(embed_dim, eps=norm_eps, **f)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.qkv_net, self.r_net, self.o_net):
            nn.init.normal_(lin.weight, std=0.02)  # Transformer-XL's "normal" init
        nn.init.normal_(self.r_w_bias, std=0.02)
        nn.init.normal_(self.r_r_bias, std=0.02)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"mem_len={self.mem_len}, clamp_len={self.clamp_len}, same_length={self.same_length}, "
                f"pre_norm={self.pre_norm}")

    def forward(self, x: torch.Tensor, mems: Optional[HiddenCache] = None):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim or x.shape[1] < 1:
            raise ValueError(f"x must be a (B, L >= 1, E={self.embed_dim}) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        h_mem = None
        if mems is not None:
            h_mem = mems[0] if isinstance(mems, tuple) else mems
            if not isinstance(h_mem, torch.Tensor) or h_mem.dim() != 3 or h_mem.shape[0] != x.shape[0] \
                    or h_mem.shape[2] != self.embed_dim:
                raise ValueError(f"mems must be the HiddenCache of the previous call: (B={x.shape[0]}, M, "
                                 f"E={self.embed_dim}) hidden states")
        B, L, _ = x.shape
        H, D = self.num_heads, self.head_dim
        cat = x if h_mem is None or h_mem.shape[1] == 0 else torch.cat([h_mem.detach().to(x.dtype), x], dim=1)
        M = cat.shape[1] - L
        heads = self.qkv_net(self.layer_norm(cat) if self.pre_norm else cat).view(B, M + L, 3, H, D)
        q = heads[:, M:, 0].transpose(1, 2)
        k, v = heads[:, :, 1].transpose(1, 2), heads[:, :, 2].transpose(1, 2)
        window = self.mem_len if self.same_length and self.mem_len > 0 else None
        P = min(window, M + L) if window else M + L
        pos = relative_pos_emb(self.r_net, P, H, D, clamp_len=self.clamp_len, dropout=self.dropout,
                               training=self.training)
        o = memory_attention(q, k[:, :, M:], v[:, :, M:], k[:, :, :M] if M else None, v[:, :, :M] if M else None,
                             causal=True, window=window, scale=D ** -0.5, pos_emb=pos, content_bias=self.r_w_bias,
                             pos_bias=self.r_r_bias, backend=self.backend)
        out = F.dropout(self.o_net(o.transpose(1, 2).reshape(B, L, H * D)), p=self.dropout, training=self.training)
        y = x + out if self.pre_norm else self.layer_norm(x + out)
        new = cat[:, max(0, cat.shape[1] - self.mem_len):].detach() if self.mem_len else cat[:, :0].detach()
        return y, HiddenCache(new)
