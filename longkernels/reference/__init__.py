"""Readable plain-PyTorch definitions of every longkernels operation."""
from .lsh_attention import lsh_attention
from .memory_attention import memory_attention

__all__ = ["lsh_attention", "memory_attention"]
