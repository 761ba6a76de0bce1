"""A ragged step with its decodes split over the keys: the ragged kernel for the sequences with
several new tokens, the split-K decode kernel for the one-token ones.

The ragged kernel gives each query block one program that walks all of its sequence's keys, so
a decode row over a long context is one long serial walk (in a mixed step at batch 1 x 32k, up
to 24x the decode kernel's time: benchmarks/kernels.md). Here the one-token sequences are left
out of the ragged call (`skip_seqs`) and their last (only) token goes through
decode_paged_attention, which splits the keys over programs and merges the partial softmaxes.
A one-token row attends causally over its sequence's keys in both kernels (with a draft tree,
its own key is its only new one), so the result is the ragged kernel's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention import decode_paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention, token_owner


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "sliding_window", "interpret"))
def mixed_paged_attention(q, k_pages, v_pages, cu_q_lens, kv_lens, page_indices, num_seqs, *,
                          sm_scale: float, soft_cap: float | None = None, sliding_window: int | None = None,
                          interpret: bool = False, tree_bits=None):
    """Same contract as ragged_paged_attention (reference.ragged_paged_attention_ref)."""
    num_tokens = q.shape[0]
    max_seqs = page_indices.shape[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    single = (q_lens == 1) & (jnp.arange(max_seqs) < num_seqs[0])
    kw = dict(sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window, interpret=interpret)
    out = ragged_paged_attention(q, k_pages, v_pages, cu_q_lens, kv_lens, page_indices, num_seqs,
                                 tree_bits=tree_bits, skip_seqs=single, **kw)
    last = jnp.clip(cu_q_lens[1:] - 1, 0, num_tokens - 1)  # a one-token sequence's row
    decoded = decode_paged_attention(q[last], k_pages, v_pages, jnp.where(single, kv_lens, 0), page_indices, **kw)
    owner = token_owner(cu_q_lens, num_tokens)
    real = jnp.arange(num_tokens) < cu_q_lens[num_seqs[0]]
    return jnp.where((single[owner] & real)[:, None, None], decoded[owner], out)
