"""A ragged step with its decodes split over the keys: the ragged kernel for the sequences with
several new tokens, the split-K decode kernel for (up to max_decodes of) the one-token ones.

The ragged kernel gives each query block one program that walks all of its sequence's keys, so
a decode row over a long context is one long serial walk (on all-decode batches at batch 1 x
32k, 24x the decode kernel's time on an H200: benchmarks/kernels.md). Here the first
max_decodes one-token sequences are left out of the ragged call (`skip_seqs`) and their only
token goes through decode_paged_attention, which splits the keys over programs and merges the
partial softmaxes; the decode call is sized to max_decodes slots, not to the batch, so the
partials it writes stay small. A one-token row attends causally over its sequence's keys in
both kernels; with a draft tree the row must see itself (its tree bit 0 set, as the engine's
trees always have: jinfer.attention.AttentionMetadata), else it stays with the ragged kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention import decode_paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "sliding_window", "interpret",
                                             "max_decodes"))
def mixed_paged_attention(q, k_pages, v_pages, cu_q_lens, kv_lens, page_indices, num_seqs, *,
                          sm_scale: float, soft_cap: float | None = None, sliding_window: int | None = None,
                          interpret: bool = False, tree_bits=None, max_decodes: int = 16):
    """Same contract as ragged_paged_attention (reference.ragged_paged_attention_ref)."""
    num_tokens = q.shape[0]
    max_seqs = page_indices.shape[0]
    last = jnp.clip(cu_q_lens[1:] - 1, 0, num_tokens - 1)  # a one-token sequence's row
    single = (cu_q_lens[1:] - cu_q_lens[:-1] == 1) & (jnp.arange(max_seqs) < num_seqs[0])
    if tree_bits is not None:
        single &= (tree_bits[last, 0] & 1) == 1
    slots = jnp.argsort(~single, stable=True)[:min(max_decodes, max_seqs)]  # one-token sequences first
    taken = single[slots]
    kw = dict(sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window, interpret=interpret)
    out = ragged_paged_attention(q, k_pages, v_pages, cu_q_lens, kv_lens, page_indices, num_seqs,
                                 tree_bits=tree_bits, skip_seqs=jnp.zeros_like(single).at[slots].set(taken), **kw)
    decoded = decode_paged_attention(q[last[slots]], k_pages, v_pages, jnp.where(taken, kv_lens[slots], 0),
                                     page_indices[slots], **kw)
    rows = jnp.where(taken, last[slots], num_tokens)  # past the end: dropped
    return out.at[rows].set(decoded.astype(out.dtype), mode="drop")
