"""Drop-in modules built on longkernels' fused operations.

    >>> import longkernels.nn
    >>> layer = longkernels.nn.MemoryAttention(512, 8, mem_len=256)
    >>> layer = longkernels.nn.LSHSelfAttention(512, 8, chunk_size=64, n_hashes=2, causal=True)
"""
from .feedforward import ChunkedFeedForward
from .lsh_attention import LSHSelfAttention
from .memory_attention import MemoryAttention, MemoryCache, RotaryEmbedding

__all__ = ["ChunkedFeedForward", "LSHSelfAttention", "MemoryAttention", "MemoryCache", "RotaryEmbedding"]
