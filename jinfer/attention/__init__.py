"""Attention backends behind one interface: "xla" (plain jnp) and "pallas" (the kernels)."""

from jinfer.attention.backend import (AttentionBackend, default_attention_backend, get_backend,
                                      register_backend)
from jinfer.attention.metadata import MAX_TREE_TOKENS, TREE_WORDS, AttentionMetadata, tree_bits_from_parents
from jinfer.attention.pallas import PallasBackend
from jinfer.attention.xla import XlaBackend

register_backend("xla", XlaBackend)
register_backend("pallas", PallasBackend)

__all__ = ["MAX_TREE_TOKENS", "TREE_WORDS", "AttentionBackend", "AttentionMetadata", "PallasBackend",
           "XlaBackend", "default_attention_backend", "get_backend", "register_backend",
           "tree_bits_from_parents"]
