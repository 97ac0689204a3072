from .memory_attention import memory_attention, MemoryAttentionFunction

__all__ = ["memory_attention", "MemoryAttentionFunction"]
