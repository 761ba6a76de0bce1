"""Pure-XLA paged attention: gather each token's pages, mask, softmax.

The reference path: simple and exact, memory O(tokens × context). The Pallas kernels are the
fast path on GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinfer.attention.metadata import AttentionMetadata
from pallas_kernels.reference import write_kv_ref

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def token_layout(md: AttentionMetadata, num_tokens: int, page_size: int):
    """Per flat token: its sequence, absolute position, and whether it is real (not padding).

    Returns (seq i32[T], pos i32[T], real bool[T]); seq and pos are clamped in range for padding.
    """
    max_seqs = md.kv_lens.shape[0]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(md.cu_q_lens[1:], t, side="right").astype(jnp.int32)
    real = t < md.cu_q_lens[md.num_seqs[0]]
    seq = jnp.minimum(seq, max_seqs - 1)
    q_start = md.cu_q_lens[seq]
    q_len = md.cu_q_lens[seq + 1] - q_start
    pos = md.kv_lens[seq] - q_len + (t - q_start)
    max_pos = md.page_indices.shape[1] * page_size - 1
    pos = jnp.where(real, jnp.clip(pos, 0, max_pos), 0)
    return seq, pos, real


def write_kv(k_pages, v_pages, k, v, md: AttentionMetadata):
    """Scatters new K/V (f[T, num_kv_heads, head_dim]) into their page slots; padding is dropped."""
    return write_kv_ref(k_pages, v_pages, k, v, md.cu_q_lens, md.kv_lens, md.page_indices, md.num_seqs)


def paged_attention(q, k_pages, v_pages, md: AttentionMetadata, *, sm_scale: float,
                    sliding_window: int | None = None):
    """Causal attention of flat queries (f[T, num_heads, head_dim]) over their sequences' pages."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    seq, pos, real = token_layout(md, num_tokens, page_size)
    pages = md.page_indices[seq]  # i32[T, pages_per_seq]
    ctx = pages.shape[1] * page_size
    k = k_pages[:, pages].reshape(num_kv_heads, num_tokens, ctx, head_dim)  # [K, T, L, D]
    v = v_pages[:, pages].reshape(num_kv_heads, num_tokens, ctx, head_dim)
    key_pos = jnp.arange(ctx, dtype=jnp.int32)[None, :]  # [1, L]
    mask = (key_pos <= pos[:, None]) & (key_pos < md.kv_lens[seq][:, None]) & real[:, None]
    if sliding_window is not None:
        mask &= key_pos > pos[:, None] - sliding_window
    # Garbage (even NaN) in unused slots must not reach the output: mask V as well as the scores.
    v = jnp.where(mask[None, :, :, None], v, 0)
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    scores = jnp.einsum("tkgd,ktld->tkgl", qg, k, preferred_element_type=jnp.float32) * sm_scale
    scores = jnp.where(mask[:, None, None, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("tkgl,ktld->tkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def step_attention(q, k, v, md: AttentionMetadata, *, page_size: int, sm_scale: float,
                   sliding_window: int | None = None):
    """Causal attention among this step's own tokens only (f[T, heads, head_dim] each).

    Exact when no sequence in the step has cached context (every chunk starts at position 0):
    then all keys are new, and a dense [T, T] mask (same sequence, not later) replaces the
    per-token page gather. O(T^2) instead of O(T × max_model_len).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    seq, pos, real = token_layout(md, num_tokens, page_size)
    mask = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None]) & real[None, :] & real[:, None]
    if sliding_window is not None:
        mask &= pos[None, :] > pos[:, None] - sliding_window
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    scores = jnp.einsum("tkgd,skd->tkgs", qg, k, preferred_element_type=jnp.float32) * sm_scale
    scores = jnp.where(mask[:, None, None, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("tkgs,skd->tkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


class XlaBackend:
    """AttentionBackend in plain jnp: scatter the new K/V, then attend.

    Steps where some sequence has cached context (decodes, later chunks, prefix hits) gather
    pages (`paged_attention`); steps of fresh prompts only attend among their own tokens
    (`step_attention`), chosen at run time by lax.cond.
    """

    decode_path = False

    def __call__(self, q, k, v, k_pages, v_pages, md, *, sm_scale, sliding_window):
        k_pages, v_pages = write_kv(k_pages, v_pages, k, v, md)
        page_size = k_pages.shape[2]
        seq, pos, real = token_layout(md, q.shape[0], page_size)
        q_start = md.kv_lens[seq] - (md.cu_q_lens[seq + 1] - md.cu_q_lens[seq])
        needs_pages = jnp.any(real & (q_start > 0))
        kw = dict(sm_scale=sm_scale, sliding_window=sliding_window)
        out = jax.lax.cond(
            needs_pages,
            lambda: paged_attention(q, k_pages, v_pages, md, **kw),
            lambda: step_attention(q, k, v, md, page_size=page_size, **kw))
        return out, k_pages, v_pages
