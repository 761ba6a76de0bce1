"""Engine configuration: frozen dataclasses per subsystem, each field checked in __post_init__."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache and prefix cache."""

    page_size: int = 16
    """Tokens per KV page."""
    num_pages: int | None = None
    """Pages in the pool; None sizes the pool from memory_fraction."""
    memory_fraction: float = 0.5
    """Share of device memory left after weights that the pool may take (when num_pages is None)."""
    enable_prefix_cache: bool = True
    """Share full pages of identical token prefixes between requests (radix tree)."""

    def __post_init__(self):
        if self.page_size <= 0:
            raise ValueError(f"page_size={self.page_size} must be > 0")
        if self.num_pages is not None and self.num_pages <= 0:
            raise ValueError(f"num_pages={self.num_pages} must be > 0")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction={self.memory_fraction} must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Per-step budgets of the continuous-batching scheduler."""

    max_num_batched_tokens: int = 256
    """Token budget of one step (prefill chunks + decodes)."""
    max_num_seqs: int = 32
    """Sequences in one step."""
    max_model_len: int = 1024
    """Longest prompt + output a request may reach, in tokens."""

    def __post_init__(self):
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                             f"max_num_seqs={self.max_num_seqs} (each sequence needs a token)")
