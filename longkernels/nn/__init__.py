"""Drop-in modules built on longkernels' fused operations.

    >>> import longkernels.nn
    >>> layer = longkernels.nn.MemoryAttention(512, 8, mem_len=256)
"""
from .memory_attention import MemoryAttention, MemoryCache, RotaryEmbedding

__all__ = ["MemoryAttention", "MemoryCache", "RotaryEmbedding"]
