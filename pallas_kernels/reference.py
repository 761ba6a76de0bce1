"""Pure-jnp references with the kernels' signatures (paged layout included). Exact and slow:
every query gathers its sequence's whole page table. The attention references are jitted (one
compilation per shape; run op by op they compiled each of their ~40 operations)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.validate import (static_validate_decode_inputs, static_validate_ragged_inputs,
                                     static_validate_write_inputs)

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def tree_visible(words, new_index):
    """Which keys each query row's draft tree lets it see: bool[R, L].

    words: the rows' tree_bits as one i32[R] per word (bit j of word w: new token 32 * w + j is
    visible); new_index: i32[R, L] or i32[1, L], each key's index among its sequence's new
    tokens (negative for cached keys). Cached keys and indices past the words are visible.
    """
    visible = (new_index < 0) | (new_index >= 32 * len(words))
    shift, word_of = new_index & 31, new_index >> 5
    for w, word in enumerate(words):
        visible |= (word_of == w) & (((word[:, None] >> shift) & 1) == 1)
    return visible


def _attend(q, k, v, q_pos, kv_len, *, sm_scale, soft_cap, sliding_window, tree=None):
    """q f[R, G, D] at positions q_pos i32[R]; k, v f[R, L, D] with kv_len i32[R] valid keys.
    tree: None, or (tree_bits i32[R, W], first new slot i32[R]) of each row."""
    key_pos = jnp.arange(k.shape[1])[None, :]
    mask = (key_pos < kv_len[:, None]) & (key_pos <= q_pos[:, None])
    if sliding_window is not None:
        mask &= key_pos > q_pos[:, None] - sliding_window
    if tree is not None:
        bits, new_start = tree
        mask &= tree_visible([bits[:, w] for w in range(bits.shape[1])], key_pos - new_start[:, None])
    s = jnp.einsum("rgd,rld->rgl", q, k, preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        s = jnp.tanh(s / soft_cap) * soft_cap
    s = jnp.where(mask[:, None, :], s, MASK_VALUE)
    m = s.max(-1, keepdims=True)
    p = jnp.where(mask[:, None, :], jnp.exp(s - m), 0.0)
    v = jnp.where(mask[:, :, None], v, 0)  # NaN in unused slots must not reach the output
    o = jnp.einsum("rgl,rld->rgd", p, v.astype(jnp.float32))
    denom = p.sum(-1, keepdims=True)
    return jnp.where(denom > 0, o / jnp.where(denom > 0, denom, 1.0), 0.0)


def _gather(pages, page_table, kv_head):
    """f[R, pages_per_seq * page_size, D] of one KV head for each row's page table."""
    g = pages[kv_head][page_table]  # [R, pages_per_seq, page_size, D]
    return g.reshape(g.shape[0], -1, g.shape[-1])


_SOFTMAX_ARGS = ("sm_scale", "soft_cap", "sliding_window")


@functools.partial(jax.jit, static_argnames=_SOFTMAX_ARGS)
def ragged_paged_attention_ref(q, k_pages, v_pages, cu_q_lens, kv_lens, page_indices, num_seqs, *,
                               sm_scale: float, soft_cap: float | None = None,
                               sliding_window: int | None = None, tree_bits=None):
    """Causal attention of flat query tokens over their sequences' pages.

    q: f[T, num_heads, head_dim]; sequence i owns tokens cu_q_lens[i]:cu_q_lens[i+1], which are
    its last q_len positions of kv_lens[i] (their K/V already in the pages). Tokens of no valid
    sequence (index >= cu_q_lens[num_seqs[0]]) get zeros. Returns f[T, num_heads, head_dim].

    tree_bits: None, or i32[T, words]: bit j of row t (word j // 32, bit j % 32) set iff new
    token j of t's sequence (counted from its first new token) is visible to t; new tokens at
    j >= 32 * words are visible, cached keys always are, and the causal rule still applies.
    A row of -1s is plain causal. Not with sliding_window (ValueError).
    """
    static_validate_ragged_inputs(q, k_pages, v_pages, cu_q_lens, kv_lens, page_indices, num_seqs,
                                  soft_cap=soft_cap, sliding_window=sliding_window, tree_bits=tree_bits)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[0]
    group = num_heads // num_kv_heads
    t = jnp.arange(num_tokens)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens[1:], t, side="right"), 0, page_indices.shape[0] - 1)
    real = t < cu_q_lens[num_seqs[0]]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    q_pos = kv_lens[seq] - q_len + (t - cu_q_lens[seq])
    kv_len = jnp.where(real, kv_lens[seq], 0)
    tree = None if tree_bits is None else (tree_bits, kv_lens[seq] - q_len)
    outs = []
    for h in range(num_kv_heads):
        k = _gather(k_pages, page_indices[seq], h)
        v = _gather(v_pages, page_indices[seq], h)
        qh = q[:, h * group:(h + 1) * group]
        outs.append(_attend(qh, k, v, q_pos, kv_len, sm_scale=sm_scale, soft_cap=soft_cap,
                            sliding_window=sliding_window, tree=tree))
    return jnp.concatenate(outs, axis=1).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=_SOFTMAX_ARGS)
def decode_paged_attention_ref(q, k_pages, v_pages, kv_lens, page_indices, *, sm_scale: float,
                               soft_cap: float | None = None, sliding_window: int | None = None):
    """One query token per sequence (its position kv_lens[i] - 1). q: f[S, num_heads, head_dim].

    Sequences with kv_lens[i] == 0 get zeros.
    """
    static_validate_decode_inputs(q, k_pages, v_pages, kv_lens, page_indices, soft_cap=soft_cap,
                                  sliding_window=sliding_window)
    num_seqs = q.shape[0]
    cu = jnp.arange(num_seqs + 1, dtype=jnp.int32)
    # Decode is the ragged case with q_len = 1; sequences with no keys are zeroed below.
    out = ragged_paged_attention_ref(q, k_pages, v_pages, cu, kv_lens, page_indices,
                                     jnp.full((1,), num_seqs, jnp.int32), sm_scale=sm_scale,
                                     soft_cap=soft_cap, sliding_window=sliding_window)
    return jnp.where((kv_lens > 0)[:, None, None], out, 0).astype(q.dtype)


def token_slots(cu_q_lens, kv_lens, page_indices, num_seqs, num_tokens: int, page_size: int):
    """(page i32[T], slot i32[T]) of every flat token; page = -1 for padding tokens."""
    t = jnp.arange(num_tokens)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens[1:], t, side="right"), 0, page_indices.shape[0] - 1)
    real = t < cu_q_lens[num_seqs[0]]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = jnp.clip(kv_lens[seq] - q_len + (t - cu_q_lens[seq]), 0, page_indices.shape[1] * page_size - 1)
    page = jnp.where(real, page_indices[seq, pos // page_size], -1).astype(jnp.int32)
    return page, (pos % page_size).astype(jnp.int32)


def write_kv_ref(k_pages, v_pages, k, v, cu_q_lens, kv_lens, page_indices, num_seqs):
    """Places new K/V (f[T, num_kv_heads, head_dim]) at their sequences' positions; padding
    tokens write nothing. Returns (k_pages, v_pages)."""
    static_validate_write_inputs(k_pages, v_pages, k, v, cu_q_lens, kv_lens, page_indices, num_seqs)
    num_pages, page_size = k_pages.shape[1], k_pages.shape[2]
    page, slot = token_slots(cu_q_lens, kv_lens, page_indices, num_seqs, k.shape[0], page_size)
    page = jnp.where(page < 0, num_pages, page)  # out of range: mode="drop" skips padding
    k_pages = k_pages.at[:, page, slot].set(jnp.swapaxes(k, 0, 1).astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[:, page, slot].set(jnp.swapaxes(v, 0, 1).astype(v_pages.dtype), mode="drop")
    return k_pages, v_pages
