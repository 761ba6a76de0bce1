"""Attention backends behind one interface: "xla" (plain jnp), "pallas" (the kernels) and
"pallas_split" (the kernels, a mixed step's decodes through the split-K decode kernel)."""

from jinfer.attention.backend import (AttentionBackend, default_attention_backend, get_backend,
                                      register_backend)
from jinfer.attention.metadata import MAX_TREE_TOKENS, TREE_WORDS, AttentionMetadata, tree_bits_from_parents
from jinfer.attention.pallas import PallasBackend
from jinfer.attention.xla import XlaBackend

register_backend("xla", XlaBackend)
register_backend("pallas", PallasBackend)
register_backend("pallas_split", lambda: PallasBackend(split_decodes=True))

__all__ = ["MAX_TREE_TOKENS", "TREE_WORDS", "AttentionBackend", "AttentionMetadata", "PallasBackend",
           "XlaBackend", "default_attention_backend", "get_backend", "register_backend",
           "tree_bits_from_parents"]
