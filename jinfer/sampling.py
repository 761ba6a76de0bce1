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
        """One row per scheduled sequence (its next token), padded to size rows."""
        return cls.from_rows([(s, 0) for s in seqs], size)

    @classmethod
    def from_rows(cls, rows, size: int) -> "SamplingArrays":
        """rows: (scheduled sequence, offset) pairs: the row samples that sequence's output
        token sample_index + offset (speculation verifies several positions of one sequence)."""
        def col(fn, dtype, pad):
            out = np.full(size, pad, dtype)
            out[:len(rows)] = [fn(s) for s, _ in rows]
            return out
        index = np.zeros(size, np.int32)
        index[:len(rows)] = [s.sample_index + j for s, j in rows]
        return cls(col(lambda s: s.params.temperature, np.float32, 0.0),
                   col(lambda s: s.params.top_k, np.int32, 0),
                   col(lambda s: s.params.top_p, np.float32, 1.0),
                   col(lambda s: s.params.min_p, np.float32, 0.0),
                   col(lambda s: s.seed, np.uint32, 0),
                   col(lambda s: s.sample_group, np.int32, 0),
                   index)


def sample(logits: jax.Array, p: SamplingArrays) -> tuple[jax.Array, jax.Array]:
    """Picks one token per row of logits (f32[S, V]); returns (ids i32[S], logprobs f32[S]).

    Sampling is Gumbel-max: argmax(filtered logits / temperature + Gumbel noise), the noise
    drawn per vocabulary id from a key of (seed, sample group, output index) alone. So a seeded
    request samples the same tokens whatever else shares its batch, again after preemption,
    and whether or not the batch needed the sorted path. Filters apply in the order top-k,
    top-p, min-p to the temperature-scaled distribution; logprobs are of the model's unscaled
    distribution. The vocabulary is sorted only when some row uses top-k or top-p, and nothing
    random is drawn when every row is greedy.
    """
    greedy_ids = first_argmax(logits)

    def prepare():  # only the random branches read these (a greedy step never builds them)
        scaled = logits / jnp.maximum(p.temperature, 1e-6)[:, None]
        top = scaled.max(axis=-1, keepdims=True)
        # min-p in logit space: p_i >= min_p * p_max  <=>  l_i >= l_max + log(min_p)
        return scaled, scaled >= top + jnp.log(p.min_p)[:, None]

    def noise():
        def row(seed, group, index):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), group), index)
            return jax.random.gumbel(key, logits.shape[-1:], jnp.float32)
        return jax.vmap(row)(p.seed, p.group, p.index)

    def draw(scaled, keep):
        return first_argmax(jnp.where(keep, scaled, -jnp.inf) + noise())

    def plain():
        return draw(*prepare())

    def filtered():
        scaled, keep_min_p = prepare()
        vocab = logits.shape[-1]
        sorted_logits = -jnp.sort(-scaled, axis=-1)  # descending
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        rank = jnp.arange(vocab)[None, :]
        keep = (p.top_k[:, None] == 0) | (rank < p.top_k[:, None])
        # top-p: keep a token if the mass strictly before it is below top_p. The most likely
        # token always stays (as in HF): a top_p that underflows float32 keeps it alone.
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep &= (mass_before < p.top_p[:, None]) | (rank == 0)
        # The kept set is every token at or above the smallest kept value (ties stay together).
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        return draw(scaled, keep_min_p & (scaled >= threshold))

    random_rows = p.temperature > 0
    needs_sort = jnp.any(random_rows & ((p.top_k > 0) | (p.top_p < 1)))
    branch = jnp.where(jnp.any(random_rows), jnp.where(needs_sort, 2, 1), 0)
    sampled = jax.lax.switch(branch, [lambda: greedy_ids, plain, filtered])
    ids = jnp.where(random_rows, sampled, greedy_ids)
    return ids, token_logprobs(logits, ids)


def first_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first index of the maximum; of the first NaN where
    a row has one), as i32, in plain reductions: XLA's CPU backend runs argmax's paired
    (value, index) reduction several times slower (a batch-64 x 49,152 vocabulary: ~5 ms
    against ~2.4 ms on 2 cores). XLA's CPU max may skip NaN, so rows with one take a second
    pass, only when some row has one."""
    vocab = x.shape[-1]
    index = jnp.arange(vocab, dtype=jnp.int32)
    top = jnp.max(x, axis=-1, keepdims=True)
    first_max = jnp.min(jnp.where(x == top, index, vocab - 1), axis=-1)
    nan_rows = jnp.isnan(jnp.sum(x, axis=-1))  # (also inf - inf: the second pass finds no NaN)

    def first_nan():
        at = jnp.min(jnp.where(jnp.isnan(x), index, vocab), axis=-1)
        return jnp.where(at < vocab, at, first_max)

    return jax.lax.cond(jnp.any(nan_rows), first_nan, lambda: first_max)


def token_logprobs(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """log_softmax(logits)[row, ids[row]] as jax.nn.log_softmax rounds it (shifted by the row's
    max, minus the log of the shifted exponentials' sum), without writing the [S, V] result."""
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    log_sum = jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
    picked = jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0]
    return (picked - top[:, 0]) - log_sum
