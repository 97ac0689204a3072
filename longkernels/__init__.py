"""longkernels: fused kernels for long-context attention.

    >>> import longkernels
    >>> out = longkernels.memory_attention(q, k, v, mem_k, mem_v, causal=True)
    >>> out = longkernels.lsh_attention(qk, v, n_hashes=2, chunk_size=64, causal=True)
"""
from . import _ext
from . import nn, reference
from .ops.lsh_attention import lsh_attention
from .ops.memory_attention import memory_attention
from .ops.reversible_coupling import reversible_coupling
from .reversible import ReversibleBlock, ReversibleSequence

__version__ = "0.3.0"

__all__ = ["lsh_attention", "memory_attention", "nn", "reference", "reversible_coupling", "ReversibleBlock",
           "ReversibleSequence", "__version__"]
