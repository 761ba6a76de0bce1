"""Decode paged attention (one query token per sequence) with split-K over pages.

Flash-decoding: each (KV head, sequence, split) program attends over at most
decode_pages_per_split pages of its sequence and writes an unnormalised partial output with
its running max and sum; a small XLA epilogue combines the splits. Long contexts thus spread
over many programs even at batch 1. The query heads of one KV head form the rows of every dot
(padded to 16 rows, the smallest Triton dot).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.blocks import block_sizes, decode_pages_per_split, fit_pages_per_block
from pallas_kernels.ragged_paged_attention import attend_pages
from pallas_kernels.validate import static_validate_decode_inputs

_MIN_ROWS = 16


def _kernel(kv_lens_ref, page_indices_ref, q_ref, k_pages_ref, v_pages_ref, o_ref, m_ref, l_ref, *,
            pages_per_block, pages_per_split, sm_scale, soft_cap, sliding_window):
    # q_ref: [rows, D]; k/v_pages_ref: [num_pages, page_size, D]; o_ref: [rows, D]; m/l_ref: [rows]
    seq, split = pl.program_id(1), pl.program_id(2)
    block_k = pages_per_block * k_pages_ref.shape[1]
    rows = q_ref.shape[0]
    kv_len = kv_lens_ref[seq]
    q = q_ref[...]
    q_pos = jnp.full((rows,), kv_len - 1, jnp.int32)
    blocks_per_split = pages_per_split // pages_per_block
    first = split * blocks_per_split
    stop = jnp.minimum(first + blocks_per_split, pl.cdiv(kv_len, block_k))
    if sliding_window is not None:
        first = jnp.maximum(first, jnp.maximum(kv_len - sliding_window, 0) // block_k)

    acc, m, l = attend_pages(q, q_pos, seq, kv_len, first, stop, page_indices_ref, k_pages_ref,
                             v_pages_ref, pages_per_block=pages_per_block, sm_scale=sm_scale,
                             soft_cap=soft_cap, sliding_window=sliding_window)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "sliding_window", "pages_per_block",
                                             "pages_per_split", "num_warps", "num_stages", "interpret"))
def decode_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, *, sm_scale: float,
                           soft_cap: float | None = None, sliding_window: int | None = None,
                           pages_per_block: int | None = None, pages_per_split: int | None = None,
                           num_warps: int | None = None, num_stages: int | None = None,
                           interpret: bool = False):
    """Same contract as reference.decode_paged_attention_ref; block sizes default to blocks.TABLE,
    the split size to blocks.decode_pages_per_split."""
    static_validate_decode_inputs(q, k_pages, v_pages, kv_lens, page_indices, soft_cap=soft_cap,
                                  sliding_window=sliding_window)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    sizes = block_sizes(head_dim, page_size)
    pages_per_seq = page_indices.shape[1]
    pages_per_block = fit_pages_per_block(pages_per_block or sizes.pages_per_block, page_size, pages_per_seq)
    pages_per_split = pages_per_split or decode_pages_per_split(num_seqs, num_kv_heads, pages_per_seq, page_size)
    pages_per_split = max(pages_per_block, pages_per_split // pages_per_block * pages_per_block)
    num_splits = pl.cdiv(pages_per_seq, pages_per_split)
    page_indices = jnp.pad(page_indices, ((0, 0), (0, num_splits * pages_per_split - pages_per_seq)))

    rows = max(_MIN_ROWS, pl.next_power_of_2(group))
    q4 = q.reshape(num_seqs, num_kv_heads, group, head_dim)
    q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    kernel = functools.partial(_kernel, pages_per_block=pages_per_block, pages_per_split=pages_per_split,
                               sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
    whole = lambda shape: pl.BlockSpec(shape, lambda h, s, p: (0,) * len(shape))
    pages_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda h, s, p: (h, 0, 0, 0))
    part = (num_seqs, num_kv_heads, num_splits, rows)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(num_kv_heads, num_seqs, num_splits),
        in_specs=[whole(kv_lens.shape), whole(page_indices.shape),
                  pl.BlockSpec((None, None, rows, head_dim), lambda h, s, p: (s, h, 0, 0)),
                  pages_spec, pages_spec],
        out_specs=[pl.BlockSpec((None, None, None, rows, head_dim), lambda h, s, p: (s, h, p, 0, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda h, s, p: (s, h, p, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda h, s, p: (s, h, p, 0))],
        out_shape=[jax.ShapeDtypeStruct(part + (head_dim,), jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32), jax.ShapeDtypeStruct(part, jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or sizes.num_warps,
                                             num_stages=num_stages or sizes.num_stages),
        interpret=interpret,
        name="decode_paged_attention",
    )(kv_lens, page_indices, q4, k_pages, v_pages)
    return combine_splits(acc, m, l)[:, :, :group].reshape(num_seqs, num_heads, head_dim).astype(q.dtype)


def combine_splits(acc, m, l):
    """Merges split-K partials: acc f32[..., splits, rows, D], m/l f32[..., splits, rows]."""
    m_all = m.max(axis=-2, keepdims=True)
    w = jnp.exp(m - m_all)  # splits with no keys have l == 0 and add nothing
    num = (acc * w[..., None]).sum(axis=-3)
    den = (l * w).sum(axis=-2)
    return jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)
