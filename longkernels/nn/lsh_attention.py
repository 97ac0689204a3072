"""Drop-in LSH self-attention layer (Reformer), batch-first."""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.lsh_attention import lsh_attention
from ..reference.lsh_attention import default_n_buckets, draw_rotations
from .memory_attention import _check_int


class LSHSelfAttention(nn.Module):
    """Reformer's shared-QK LSH self-attention over ``(B, L, E)`` inputs, returning ``(B, L, E)``.

    Projections as in Reformer (trax, HuggingFace): one shared query/key projection, a value
    projection and an output projection, without biases by default. Keys are the length-normalised
    queries (:func:`longkernels.lsh_attention`).

    Rotations (the hash). Each forward draws fresh rotations from torch's RNG, as Reformer does in
    training, and keeps them in ``last_rotations`` so that a recomputation (a reversible stack's
    backward, an activation checkpoint) can replay the same hash with ``forward(x, rotations=...)``.
    For reproducible evaluation either fix them (:meth:`set_rotations`) or give a ``seed``: then
    every forward in eval mode hashes with rotations drawn from a generator seeded with it (the same
    rotations each call, whatever the global RNG does). Like dropout, this follows the module's
    training flag, not the grad mode: a training-mode forward under ``torch.no_grad`` (or inside a
    reversible stack's forward, which runs without a graph) still draws fresh rotations.

    Dropout is applied to the output, in training: the fused kernels never materialise the
    attention probabilities, so HuggingFace's attention-probability dropout is not available.

    Args:
        embed_dim: model width ``E``; head dim ``D = E // num_heads``.
        num_heads: heads ``H``.
        chunk_size: queries per chunk of the sorted sequence.
        n_hashes: hashing rounds.
        n_buckets: even; default per call from the sequence length (see lsh_attention).
        causal: mask later positions (a decoder).
        dropout: dropout probability on the output.
        n_chunks_before, n_chunks_after: look-around of each chunk.
        bias: biases on the three projections.
        seed: seed of the evaluation rotations (see above); None: fresh rotations every call.
        backend: forwarded to :func:`longkernels.lsh_attention`.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, chunk_size: int = 64, n_hashes: int = 2,
                 n_buckets: Optional[int] = None, causal: bool = False, dropout: float = 0.0,
                 n_chunks_before: int = 1, n_chunks_after: int = 0, bias: bool = False, seed: Optional[int] = None,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        embed_dim = _check_int("embed_dim", embed_dim, minimum=1)
        num_heads = _check_int("num_heads", num_heads, minimum=1)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.chunk_size = _check_int("chunk_size", chunk_size, minimum=1)
        self.n_hashes = _check_int("n_hashes", n_hashes, minimum=1)
        if n_buckets is not None:
            n_buckets = _check_int("n_buckets", n_buckets, minimum=2)
            if n_buckets % 2:
                raise ValueError(f"n_buckets must be even, got {n_buckets}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        if seed is not None:
            seed = _check_int("seed", seed, minimum=0)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.n_buckets = n_buckets
        self.causal = causal
        self.dropout = float(dropout)
        self.n_chunks_before = _check_int("n_chunks_before", n_chunks_before, minimum=0)
        self.n_chunks_after = _check_int("n_chunks_after", n_chunks_after, minimum=0)
        self.seed = seed
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.qk_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.fixed_rotations: Optional[torch.Tensor] = None
        self.last_rotations: Optional[torch.Tensor] = None
        self._last_drawn = False  # whether last_rotations came from torch's global RNG
        self._replay: Optional[tuple] = None

    # Replay protocol of recomputing wrappers (longkernels.ReversibleSequence): the state a forward
    # used, and a one-shot order to use it again in the next forward. A replay of rotations that
    # were drawn from torch's RNG draws (and discards) as many numbers again, so that random draws
    # after it (dropout) see the stream they saw in the recorded forward.
    def _get_replay_state(self):
        return (self.last_rotations, self._last_drawn)

    def _set_replay_state(self, state) -> None:
        self._replay = state

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, chunk_size={self.chunk_size}, "
                f"n_hashes={self.n_hashes}, n_buckets={self.n_buckets}, causal={self.causal}, "
                f"dropout={self.dropout}, seed={self.seed}, backend={self.backend}")

    def buckets_for(self, seq_len: int) -> int:
        return self.n_buckets if self.n_buckets is not None else default_n_buckets(seq_len, self.chunk_size)

    def set_rotations(self, rotations: Optional[torch.Tensor]) -> None:
        """Fixes the rotations of every later forward, ``(H, D, n_hashes, n_buckets // 2)``; None
        returns to drawing them."""
        if rotations is not None:
            expected = (self.num_heads, self.head_dim, self.n_hashes)
            if not isinstance(rotations, torch.Tensor) or rotations.dim() != 4 or \
                    tuple(rotations.shape[:3]) != expected:
                raise ValueError(f"rotations must be a tensor (H, D, n_hashes, n_buckets // 2) = "
                                 f"{expected + ('...',)}, got {getattr(rotations, 'shape', rotations)!r}")
            rotations = rotations.detach()
        self.fixed_rotations = rotations

    def _rotations(self, seq_len: int, device) -> Optional[torch.Tensor]:
        if self.fixed_rotations is not None:
            return self.fixed_rotations.to(device)
        if self.seed is not None and not self.training:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            return draw_rotations(self.num_heads, self.head_dim, self.n_hashes, self.buckets_for(seq_len),
                                  device=device, generator=gen)
        return None  # fresh, drawn by lsh_attention from torch's RNG

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                rotations: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: ``(B, L, E)``; key_padding_mask: ``(B, L)`` bool, True for padding; rotations: replay
        a hash (e.g. ``last_rotations``). Returns ``(B, L, E)``; padded positions' outputs are
        whatever the layer computes for them and should be ignored."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, L, embed_dim={self.embed_dim}), got shape {tuple(x.shape)}")
        B, L, _ = x.shape
        drawn = False
        if rotations is None and self._replay is not None:
            (rotations, drawn), self._replay = self._replay, None
            if drawn:
                draw_rotations(*rotations.shape[:3], 2 * rotations.shape[3], device=x.device)
        elif rotations is None:
            rotations = self._rotations(L, x.device)
            drawn = rotations is None
        # (B, L, H, D) seen as (B, H, L, D): strided views, which the kernels read in place.
        qk = self.qk_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        out, used = lsh_attention(qk, v, n_hashes=self.n_hashes, chunk_size=self.chunk_size,
                                  n_buckets=None if rotations is not None else self.buckets_for(L),
                                  causal=self.causal, rotations=rotations, n_chunks_before=self.n_chunks_before,
                                  n_chunks_after=self.n_chunks_after, key_padding_mask=key_padding_mask,
                                  return_rotations=True, backend=self.backend)
        self.last_rotations = used.detach()
        self._last_drawn = drawn
        y = self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))
        return F.dropout(y, p=self.dropout, training=self.training)
