"""Attention backends behind one interface; "xla" ships here, "pallas" with the kernels."""

from jinfer.attention.backend import AttentionBackend, get_backend, register_backend
from jinfer.attention.metadata import AttentionMetadata
from jinfer.attention.xla import XlaBackend

register_backend("xla", XlaBackend)

__all__ = ["AttentionBackend", "AttentionMetadata", "XlaBackend", "get_backend", "register_backend"]
