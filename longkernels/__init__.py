"""longkernels: fused kernels for long-context attention.

    >>> import longkernels
    >>> out = longkernels.memory_attention(q, k, v, mem_k, mem_v, causal=True)
    >>> out = longkernels.lsh_attention(qk, v, n_hashes=2, chunk_size=64, causal=True)
    >>> out, lse = longkernels.merge_attention([o1, o2], [lse1, lse2])   # attention over the union of key sets

Context parallelism (ring and Ulysses attention over torch.distributed): ``longkernels.distributed``.
"""
from . import _ext
from . import nn, reference
from .ops.lsh_attention import lsh_attention
from .ops.memory_attention import memory_attention
from .ops.merge_attention import merge_attention
from .ops.reversible_coupling import reversible_coupling
from .reversible import ReversibleBlock, ReversibleSequence

__version__ = "0.4.0"

__all__ = ["lsh_attention", "memory_attention", "merge_attention", "nn", "reference", "reversible_coupling", "ReversibleBlock",
           "ReversibleSequence", "__version__"]
