"""Rotary position embeddings (HF "rotate half" layout) with llama3 and linear scaling."""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from jinfer.models.config import ModelConfig


@functools.lru_cache(maxsize=64)
def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """f32[head_dim // 2]: radians per position for each rotated pair, scaling applied."""
    d = config.head_dim
    # float32 throughout, as HF computes it, so positions far out rotate identically.
    exponents = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
    inv_freq = np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)
    s = config.rope_scaling
    if s.rope_type == "linear":
        inv_freq = inv_freq / s.factor
    elif s.rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                  / (s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
        blended = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, blended, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
    """Rotates x (f[T, heads, head_dim]) by its token positions (i32[T]); computed in f32."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # f32[T, D/2]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
