"""The attention backend interface the model calls, and the registry of backends."""

from __future__ import annotations

from typing import Callable, Protocol

import jax

from jinfer.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    """Writes this step's K/V into the pages, then attends over each sequence's pages.

    Args:
      q: f[T, num_heads, head_dim], RoPE applied.
      k, v: f[T, num_kv_heads, head_dim], the new tokens' keys and values.
      k_pages, v_pages: f[num_kv_heads, num_pages, page_size, head_dim], donated.
      md: the ragged batch; md.tree_bits (optional) restricts each row's new-token keys to its
        draft-tree ancestors (speculative decoding). A step with trees is never decode_only.
      sm_scale: softmax scale, usually head_dim ** -0.5.
      sliding_window: attend only to keys with position > query position - window; None = all.
        Not with md.tree_bits (ValueError).
    Returns:
      (out f[T, num_heads, head_dim], k_pages, v_pages). Rows of padding tokens are unspecified
      but finite; slots outside every sequence's length never reach any output (NaN-safe).

    A backend whose `decode_path` is True has a specialised path for md.decode_only steps; the
    runner then marks such steps (one more compiled variant per bucket), otherwise it does not.
    """

    decode_path: bool

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, k_pages: jax.Array,
                 v_pages: jax.Array, md: AttentionMetadata, *, sm_scale: float,
                 sliding_window: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        ...


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {}


def register_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    _BACKENDS[name] = factory


def get_backend(name: str) -> AttentionBackend:
    """Returns the backend called `name`; raises ValueError listing the known ones."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention_backend={name!r}; known: {sorted(_BACKENDS)}")
    return _BACKENDS[name]()


def default_attention_backend() -> str:
    """"pallas" where the kernels compile (NVIDIA GPUs), "xla" elsewhere."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"
