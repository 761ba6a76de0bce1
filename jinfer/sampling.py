"""Token sampling for a batch with per-sequence parameters, inside the jitted step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """Per-sequence sampling parameters, padded to the step's sequence bucket."""

    temperature: jax.Array  # f32[S], 0 = greedy
    top_k: jax.Array  # i32[S], 0 = off
    top_p: jax.Array  # f32[S]
    min_p: jax.Array  # f32[S]
    seed: jax.Array  # u32[S]
    group: jax.Array  # i32[S], which of its prompt's n samples
    index: jax.Array  # i32[S], which output token of its request this is

    @classmethod
    def from_seqs(cls, seqs, size: int) -> "SamplingArrays":
        def col(fn, dtype, pad):
            out = np.full(size, pad, dtype)
            out[:len(seqs)] = [fn(s) for s in seqs]
            return out
        return cls(col(lambda s: s.params.temperature, np.float32, 0.0),
                   col(lambda s: s.params.top_k, np.int32, 0),
                   col(lambda s: s.params.top_p, np.float32, 1.0),
                   col(lambda s: s.params.min_p, np.float32, 0.0),
                   col(lambda s: s.seed, np.uint32, 0),
                   col(lambda s: s.sample_group, np.int32, 0),
                   col(lambda s: s.sample_index, np.int32, 0))


def sample(logits: jax.Array, p: SamplingArrays) -> tuple[jax.Array, jax.Array]:
    """Picks one token per row of logits (f32[S, V]); returns (ids i32[S], logprobs f32[S]).

    Randomness is keyed by (seed, sample group, output index) alone, so a seeded request samples the same
    tokens whatever else shares its batch, and again after preemption. Filters apply in the
    order top-k, top-p, min-p to the temperature-scaled distribution; logprobs are of the
    model's unscaled distribution.
    """
    vocab = logits.shape[-1]
    logprobs_all = jax.nn.log_softmax(logits, axis=-1)
    greedy_ids = jnp.argmax(logits, axis=-1)

    scaled = logits / jnp.maximum(p.temperature, 1e-6)[:, None]
    sorted_logits, sorted_ids = jax.lax.top_k(scaled, vocab)  # descending
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    keep = (p.top_k[:, None] == 0) | (rank < p.top_k[:, None])
    # top-p: keep a token if the mass strictly before it is below top_p (the first always stays).
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep &= mass_before < p.top_p[:, None]
    keep &= sorted_probs >= p.min_p[:, None] * sorted_probs[:, :1]
    masked = jnp.where(keep, sorted_logits, -jnp.inf)

    def draw(seed, group, index, row):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), group), index)
        return jax.random.categorical(key, row)

    choice = jax.vmap(draw)(p.seed, p.group, p.index, masked)
    sampled_ids = jnp.take_along_axis(sorted_ids, choice[:, None], axis=-1)[:, 0]
    ids = jnp.where(p.temperature == 0, greedy_ids, sampled_ids).astype(jnp.int32)
    return ids, jnp.take_along_axis(logprobs_all, ids[:, None], axis=-1)[:, 0]
