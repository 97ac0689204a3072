"""Readable plain-PyTorch definitions of every longkernels operation."""
from .memory_attention import memory_attention

__all__ = ["memory_attention"]
