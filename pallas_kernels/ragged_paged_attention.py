"""Ragged paged attention: decodes and prefill chunks of many sequences in one Pallas call.

Work is split into (KV head, query block) programs. A query block is up to block_q consecutive
tokens of ONE sequence; the list of blocks (sequence, first token) is computed in XLA before
the call, so the grid has a static size: cdiv(num_tokens, block_q) + max_seqs programs per KV
head, the unused ones exit at once. Each program loads its block's queries for all query heads
of its KV head (GQA: block_q * group rows share every K/V tile), then walks the sequence's
pages block_k keys at a time with an online softmax in float32, up to the causal limit of its
last token. K/V outside the sequence's length are masked in the scores AND in V, so NaN in
unused page slots never reaches the output. With tree_bits (speculative decoding with draft
trees) a row also masks the new tokens of its sequence that are not its tree ancestors; the
key range stays the causal one.

The body is plain jnp on loaded tiles (`online_softmax_step`) plus Triton-style masked
loads/stores; a Mosaic GPU variant can reuse the former with its own memory movement.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.blocks import block_sizes, fit_pages_per_block
from pallas_kernels.reference import MASK_VALUE, tree_visible
from pallas_kernels.validate import static_validate_ragged_inputs


def online_softmax_step(carry, q, k, v, q_pos, key_pos, kv_len, *, sm_scale, soft_cap,
                        sliding_window, tree=None):
    """One K/V tile of flash attention. q f[R, D]; k, v f[Bk, D]; q_pos i32[R]; key_pos i32[Bk].

    carry = (acc f32[R, D], m f32[R], l f32[R]). Keys at or past kv_len, after q_pos, outside
    the sliding window or, with tree = (words, new_start) (the rows' tree_bits as one i32[R]
    per word; the sequence's first new slot), outside the row's draft tree are masked; masked
    V rows are zeroed so garbage cannot leak through p*V.
    """
    acc, m, l = carry
    valid_k = key_pos < kv_len
    mask = valid_k[None, :] & (key_pos[None, :] <= q_pos[:, None])
    if sliding_window is not None:
        mask &= key_pos[None, :] > q_pos[:, None] - sliding_window
    if tree is not None:
        words, new_start = tree
        mask &= tree_visible(words, key_pos[None, :] - new_start)
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        s = jnp.tanh(s / soft_cap) * soft_cap
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=-1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    v = jnp.where(valid_k[:, None], v, jnp.zeros_like(v))
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, m_new, l * alpha + p.sum(axis=-1)


def attend_pages(q, q_pos, seq, kv_len, first_block, stop_block, page_indices_ref, k_pages_ref,
                 v_pages_ref, *, pages_per_block, **softmax_kw):
    """Online softmax of q f[R, D] over key blocks [first_block, stop_block) of sequence seq's
    pages (pages_per_block pages each). Returns (acc f32[R, D], max f32[R], sum f32[R])."""
    page_size, head_dim = k_pages_ref.shape[1], k_pages_ref.shape[2]
    block_k = pages_per_block * page_size

    def body(j, carry):
        pages = page_indices_ref[seq, pl.ds(j * pages_per_block, pages_per_block)]
        k = k_pages_ref[pages].reshape(block_k, head_dim)
        v = v_pages_ref[pages].reshape(block_k, head_dim)
        key_pos = j * block_k + jnp.arange(block_k)
        return online_softmax_step(carry, q, k, v, q_pos, key_pos, kv_len, **softmax_kw)

    rows = q.shape[0]
    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    return jax.lax.fori_loop(first_block, stop_block, body, init)


def _kernel(work_seq_ref, work_start_ref, cu_q_lens_ref, kv_lens_ref, page_indices_ref,
            q_ref, k_pages_ref, v_pages_ref, *rest, block_q, group, pages_per_block,
            sm_scale, soft_cap, sliding_window):
    # work_seq_ref/work_start_ref: i32[num_items]; cu_q_lens_ref: i32[max_seqs + 1];
    # kv_lens_ref: i32[max_seqs]; page_indices_ref: i32[max_seqs, padded pages_per_seq]
    # q_ref/o_ref: f[T + block_q, KVH * group, D] (padded so a block never runs off the end; group
    # a power of two)
    # k_pages_ref/v_pages_ref: f[num_pages, page_size, D] of this program's KV head
    # rest: (o_ref,), or (tree_ref i32[words, T + block_q] (tree_bits transposed, padded with -1),
    # o_ref) with trees
    tree_ref, o_ref = rest if len(rest) == 2 else (None, rest[0])
    kv_head, item = pl.program_id(0), pl.program_id(1)
    seq = work_seq_ref[item]
    start = work_start_ref[item]  # first token of the block; -1 = no work
    page_size, head_dim = k_pages_ref.shape[1], k_pages_ref.shape[2]
    block_k = pages_per_block * page_size

    @pl.when(start >= 0)
    def _():
        q_begin, q_end = cu_q_lens_ref[seq], cu_q_lens_ref[seq + 1]
        kv_len = kv_lens_ref[seq]
        first_pos = kv_len - (q_end - q_begin) + (start - q_begin)  # the block's first row
        tok = start + jnp.arange(block_q)
        row_ok = tok < q_end
        pos = first_pos + jnp.arange(block_q)  # absolute positions, i32[block_q]
        heads = pl.ds(kv_head * group, group)
        q = plgpu.load(q_ref.at[pl.ds(start, block_q), heads, :], mask=row_ok[:, None, None], other=0)
        q = q.reshape(block_q * group, head_dim)
        per_row = lambda x: jnp.broadcast_to(x[:, None], (block_q, group)).reshape(block_q * group)
        q_pos = per_row(pos)
        tree = None
        if tree_ref is not None:
            load_word = lambda w: plgpu.load(tree_ref.at[pl.ds(w, 1), pl.ds(start, block_q)],
                                             mask=row_ok[None, :], other=-1).reshape(block_q)
            words = [per_row(load_word(w)) for w in range(tree_ref.shape[0])]  # i32[block_q * group] each
            tree = (words, kv_len - (q_end - q_begin))

        last = jnp.minimum(kv_len, jnp.max(jnp.where(row_ok, pos, 0)) + 1)  # keys needed
        first_block = 0
        if sliding_window is not None:
            lowest = jnp.maximum(first_pos - sliding_window + 1, 0)
            first_block = lowest // block_k

        acc, _, l = attend_pages(q, q_pos, seq, kv_len, first_block, pl.cdiv(last, block_k),
                                 page_indices_ref, k_pages_ref, v_pages_ref,
                                 pages_per_block=pages_per_block, sm_scale=sm_scale,
                                 soft_cap=soft_cap, sliding_window=sliding_window, tree=tree)
        out = jnp.where(l[:, None] > 0, acc / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
        plgpu.store(o_ref.at[pl.ds(start, block_q), heads, :],
                    out.reshape(block_q, group, head_dim).astype(o_ref.dtype),
                    mask=row_ok[:, None, None])


def _work_list(cu_q_lens, num_seqs, num_items: int, block_q: int, skip_seqs=None):
    """(sequence, first token) of every query block, -1 past the last; i32[num_items] each.
    Sequences marked in skip_seqs (bool[max_seqs]) get no block."""
    max_seqs = cu_q_lens.shape[0] - 1
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    keep = jnp.arange(max_seqs) < num_seqs[0]
    if skip_seqs is not None:
        keep &= ~skip_seqs
    q_lens = jnp.where(keep, q_lens, 0)
    blocks = (q_lens + block_q - 1) // block_q
    ends = jnp.cumsum(blocks)
    item = jnp.arange(num_items)
    seq = jnp.minimum(jnp.searchsorted(ends, item, side="right"), max_seqs - 1).astype(jnp.int32)
    j = item - (ends[seq] - blocks[seq])
    start = jnp.where(item < ends[-1], cu_q_lens[seq] + j * block_q, -1).astype(jnp.int32)
    return seq, start


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "sliding_window", "block_q",
                                             "pages_per_block", "num_warps", "num_stages", "interpret"))
def ragged_paged_attention(q, k_pages, v_pages, cu_q_lens, kv_lens, page_indices, num_seqs, *,
                           sm_scale: float, soft_cap: float | None = None,
                           sliding_window: int | None = None, block_q: int | None = None,
                           pages_per_block: int | None = None, num_warps: int | None = None,
                           num_stages: int | None = None, interpret: bool = False, tree_bits=None,
                           skip_seqs=None):
    """Same contract as reference.ragged_paged_attention_ref (tree_bits included); block sizes
    default to blocks.TABLE. skip_seqs (bool[max_seqs], optional): sequences left out; their
    rows come back as zeros (mixed_paged_attention computes its decodes' rows elsewhere)."""
    static_validate_ragged_inputs(q, k_pages, v_pages, cu_q_lens, kv_lens, page_indices, num_seqs,
                                  soft_cap=soft_cap, sliding_window=sliding_window, tree_bits=tree_bits)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    sizes = block_sizes(head_dim, page_size)
    block_q = block_q or sizes.block_q
    pages_per_block = fit_pages_per_block(pages_per_block or sizes.pages_per_block, page_size,
                                          page_indices.shape[1])
    max_seqs, pages_per_seq = page_indices.shape
    pad_pages = -pages_per_seq % pages_per_block
    page_indices = jnp.pad(page_indices, ((0, 0), (0, pad_pages)))  # whole blocks, padded with page 0
    num_items = pl.cdiv(num_tokens, block_q) + max_seqs
    work_seq, work_start = _work_list(cu_q_lens, num_seqs, num_items, block_q, skip_seqs)
    group = num_heads // num_kv_heads
    # Triton tiles must have power-of-two sizes: a group of another size (SmolLM2's 3, Qwen2.5-7B's
    # 7) is filled with zero query heads, whose outputs are dropped.
    wide = pl.next_power_of_2(group)
    q_padded = jnp.pad(q.reshape(num_tokens, num_kv_heads, group, head_dim),
                       ((0, block_q), (0, 0), (0, wide - group), (0, 0))).reshape(-1, num_kv_heads * wide, head_dim)

    kernel = functools.partial(
        _kernel, block_q=block_q, group=wide, pages_per_block=pages_per_block,
        sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
    whole = lambda shape: pl.BlockSpec(shape, lambda h, i: (0,) * len(shape))
    pages_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda h, i: (h, 0, 0, 0))
    in_specs = [whole(work_seq.shape), whole(work_start.shape), whole(cu_q_lens.shape),
                whole(kv_lens.shape), whole(page_indices.shape), whole(q_padded.shape),
                pages_spec, pages_spec]
    args = [work_seq, work_start, cu_q_lens, kv_lens, page_indices, q_padded, k_pages, v_pages]
    if tree_bits is not None:  # an extra input only with trees: steps without keep their program
        tree_padded = jnp.pad(tree_bits.T, ((0, 0), (0, block_q)), constant_values=-1)  # rows contiguous
        in_specs.append(whole(tree_padded.shape))
        args.append(tree_padded)
    out = pl.pallas_call(
        kernel,
        grid=(num_kv_heads, num_items),
        in_specs=in_specs,
        out_specs=whole(q_padded.shape),
        out_shape=jax.ShapeDtypeStruct(q_padded.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or sizes.num_warps,
                                             num_stages=num_stages or sizes.num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(*args)
    out = out[:num_tokens].reshape(num_tokens, num_kv_heads, wide, head_dim)[:, :, :group].reshape(q.shape)
    # Rows no block covers (padding tokens, skipped sequences) were never written: make them
    # zeros, as in the reference.
    real = jnp.arange(num_tokens) < cu_q_lens[num_seqs[0]]
    if skip_seqs is not None:
        real &= ~skip_seqs[_token_owner(cu_q_lens, num_tokens)]
    return jnp.where(real[:, None, None], out, 0).astype(q.dtype)


def _token_owner(cu_q_lens, num_tokens: int):
    """Each token's sequence (i32[num_tokens]; tokens past the last sequence: the last row)."""
    max_seqs = cu_q_lens.shape[0] - 1
    owner = jnp.searchsorted(cu_q_lens[1:], jnp.arange(num_tokens), side="right")
    return jnp.minimum(owner, max_seqs - 1).astype(jnp.int32)
