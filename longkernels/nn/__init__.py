"""Drop-in modules built on longkernels' fused operations.

    >>> import longkernels.nn
    >>> layer = longkernels.nn.MemoryAttention(512, 8, mem_len=256)
    >>> layer = longkernels.nn.RelativeMemoryAttention(512, 8, mem_len=256)   # Transformer-XL's own layer
    >>> layer = longkernels.nn.LSHSelfAttention(512, 8, chunk_size=64, n_hashes=2, causal=True)
    >>> model = longkernels.nn.LongContextLM(256, 512, depth=6, num_heads=8, attention="memory", mem_len=512)
"""
from .blocks import LMOutput, LongContextLM, PreNorm, ReformerBlock
from .feedforward import ChunkedFeedForward
from .lsh_attention import LSHSelfAttention
from .memory_attention import MemoryAttention, MemoryCache, RotaryEmbedding
from .relative import HiddenCache, RelativeMemoryAttention, sinusoid_positions

__all__ = ["ChunkedFeedForward", "HiddenCache", "LMOutput", "LSHSelfAttention", "LongContextLM", "MemoryAttention",
           "MemoryCache", "PreNorm", "ReformerBlock", "RelativeMemoryAttention", "RotaryEmbedding",
           "sinusoid_positions"]
