"""Test helper: the model alone as a jitted forward over (params, ragged batch, paged cache),
the cache donated; the engine runs the same model through jinfer.runner."""

from __future__ import annotations

import functools

import jax
from flax import nnx

from jinfer.attention import AttentionMetadata
from jinfer.kv_cache import KVCache


def jit_forward(model: nnx.Module):
    """Returns fwd(input_ids, positions, kv_cache, md, logits_indices=None) -> (logits, kv_cache).

    The model is split once into a static graph and a state pytree; the state is an explicit
    argument of the compiled function (no hidden globals) and the KV cache is donated.
    """
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=(3,))
    def step(state, input_ids, positions, kv_cache: KVCache, md: AttentionMetadata, logits_indices):
        return nnx.merge(graphdef, state)(input_ids, positions, kv_cache, md, logits_indices)

    def fwd(input_ids, positions, kv_cache, md, logits_indices=None):
        return step(state, input_ids, positions, kv_cache, md, logits_indices)

    return fwd
