"""The paged KV cache: per layer, K and V pages in heads-major layout."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jinfer.models.config import ModelConfig
from sharding.rules import KV_LOGICAL_AXES  # noqa: F401  (re-exported: where the pool's axes are named)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """K and V pages for every layer; pass it into a jitted step and donate it."""

    k: tuple[jax.Array, ...]  # num_layers × f[num_kv_heads, num_pages, page_size, head_dim]
    v: tuple[jax.Array, ...]  # same as k

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[1]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    @staticmethod
    def shape(config: ModelConfig, num_pages: int, page_size: int) -> tuple[int, ...]:
        return (config.num_kv_heads, num_pages, page_size, config.head_dim)

    @classmethod
    def abstract(cls, config: ModelConfig, num_pages: int, page_size: int, dtype=jnp.float32,
                 sharding=None) -> "KVCache":
        """Shape-only form, for memory sizing and ahead-of-time compilation."""
        s = jax.ShapeDtypeStruct(cls.shape(config, num_pages, page_size), dtype, sharding=sharding)
        return cls(tuple(s for _ in range(config.num_layers)), tuple(s for _ in range(config.num_layers)))

    @classmethod
    def create(cls, config: ModelConfig, num_pages: int, page_size: int, dtype=jnp.float32,
               fill: float = 0.0) -> "KVCache":
        """Allocates the pool; `fill=nan` poisons unused slots (tests use it)."""
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"{num_pages=} and {page_size=} must be > 0")
        shape = cls.shape(config, num_pages, page_size)
        layers = lambda: tuple(jnp.full(shape, fill, dtype) for _ in range(config.num_layers))
        return cls(layers(), layers())

    @classmethod
    def create_sharded(cls, config: ModelConfig, num_pages: int, page_size: int, dtype, sharding) -> "KVCache":
        """The pool allocated directly in its shards (no full copy on one device)."""
        shardings = cls(*(tuple(sharding for _ in range(config.num_layers)),) * 2)
        return jax.jit(lambda: cls.create(config, num_pages, page_size, dtype=dtype),
                       out_shardings=shardings)()

    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in self.k + self.v)
