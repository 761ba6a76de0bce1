"""Pure-XLA paged attention over a ragged batch: the CPU path, and fast enough to be one.

Work is proportional to the keys each sequence actually has, never to max_model_len and never
per query token times context:

- decode rows (sequences with one new token): all of them at once, one row per sequence, over
  blocks of `kv_block` keys, for as many blocks as the longest of them needs;
- chunks (sequences with two or more new tokens: prefill, chunked prefill, prefix hits, draft
  trees): tiles of `q_tile` consecutive query rows of one sequence, each over the key blocks up
  to its last row's position (causal: later blocks are never touched). With md.tree_bits a
  row's mask also drops the new tokens that are not its tree ancestors.

Both loops have trip counts read from the batch at run time (`lax.fori_loop` with traced
bounds), so padding rows and sequences of a bucket cost almost nothing, and one compiled
program serves a step of any mix. Keys are gathered per sequence (decodes) or per tile
(chunks) a block at a time, never as a [tokens, context] array. Softmax is online (running
max and sum in f32, as flash attention does), so the result equals the plain softmax up to
float rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinfer.attention.metadata import AttentionMetadata
from pallas_kernels.reference import tree_visible, write_kv_ref
from pallas_kernels.validate import static_validate_tree_bits

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def write_kv(k_pages, v_pages, k, v, md: AttentionMetadata):
    """Scatters new K/V (f[T, num_kv_heads, head_dim]) into their page slots; padding is dropped."""
    return write_kv_ref(k_pages, v_pages, k, v, md.cu_q_lens, md.kv_lens, md.page_indices, md.num_seqs)


def _online_update(state, scores, mask, v_blk, pv_spec: str):
    """One key block of online softmax. state = (m f32[..., 1], l f32[..., 1], acc f32[..., D]);
    scores f32[..., L] already scaled; mask broadcastable to scores; v_blk the block's values."""
    m, l, acc = state
    scores = jnp.where(mask, scores, _MASK_VALUE)
    m_new = jnp.maximum(m, scores.max(-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(scores - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    pv = jnp.einsum(pv_spec, p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
    return m_new, l * alpha + p.sum(-1, keepdims=True), acc * alpha + pv


def _finish(state):
    _, l, acc = state
    return jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)


def _init_state(shape, head_dim):
    return (jnp.full(shape + (1,), _MASK_VALUE, jnp.float32), jnp.zeros(shape + (1,), jnp.float32),
            jnp.zeros(shape + (head_dim,), jnp.float32))


def _decode_rows(q, k_pages, v_pages, md, q_len, *, sm_scale, sliding_window, pages_per_block):
    """Attention of each one-token sequence's row over its pages. Returns f32[S, K, G, D] (rows of
    other sequences: zeros).

    The pages of all decoding sequences are laid end to end in one list (sequence by sequence)
    and taken pages_per_block at a time, so a step reads each page its sequences use once and
    no page past a sequence's length: decodes of very different lengths cost their sum, not
    the batch size times the longest. Each block's partial softmax is merged into its
    sequences' running (max, sum, output) by segment max / add.
    """
    num_kv_heads, _, page_size, head_dim = k_pages.shape
    max_seqs, pages_per_seq = md.page_indices.shape
    group = q.shape[1] // num_kv_heads
    live = (jnp.arange(max_seqs) < md.num_seqs[0]) & (q_len == 1)
    kv_len = jnp.where(live, md.kv_lens, 0)  # i32[S]
    q_pos = kv_len - 1
    rows = jnp.minimum(md.cu_q_lens[:max_seqs], q.shape[0] - 1)
    qr = q[rows].reshape(max_seqs, num_kv_heads, group, head_dim)  # [S, K, G, D]
    # The flat page list: entry i is page j of sequence seq (both i32[max_seqs * pages_per_seq]).
    num_pages = -(-kv_len // page_size)
    ends = jnp.cumsum(num_pages)
    total = ends[-1]
    bound = -(-max_seqs * pages_per_seq // pages_per_block) * pages_per_block
    flat = jnp.arange(bound)
    seq = jnp.minimum(jnp.searchsorted(ends, flat, side="right"), max_seqs - 1)
    page_no = flat - (ends[seq] - num_pages[seq])
    page_id = md.page_indices[seq, jnp.clip(page_no, 0, pages_per_seq - 1)]
    seq = jnp.where(flat < total, seq, max_seqs)  # past the list: a dropped segment

    def body(c, state):
        m, l, acc = state  # f32[S, K, G, 1 / 1 / D]
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, c * pages_per_block, pages_per_block)
        sid, pno, pid = take(seq), take(page_no), take(page_id)  # i32[C]
        k_blk = jnp.swapaxes(k_pages[:, pid], 0, 1)  # [C, K, page, D]
        v_blk = jnp.swapaxes(v_pages[:, pid], 0, 1)
        safe = jnp.minimum(sid, max_seqs - 1)
        key_pos = pno[:, None] * page_size + jnp.arange(page_size)[None, :]  # [C, page]
        mask = (key_pos < kv_len[safe][:, None]) & (sid < max_seqs)[:, None]
        if sliding_window is not None:
            mask &= key_pos > q_pos[safe][:, None] - sliding_window
        # Garbage (even NaN) in unused slots must not reach the output: mask V as well as scores.
        v_blk = jnp.where(mask[:, None, :, None], v_blk, 0)
        scores = jnp.einsum("ckgd,ckld->ckgl", qr[safe], k_blk, preferred_element_type=jnp.float32) * sm_scale
        scores = jnp.where(mask[:, None, None, :], scores, _MASK_VALUE)
        m_blk = scores.max(-1, keepdims=True)  # [C, K, G, 1]
        p = jnp.where(mask[:, None, None, :], jnp.exp(scores - m_blk), 0.0)
        pv = jnp.einsum("ckgl,ckld->ckgd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
        m_new = jnp.maximum(m, m.at[sid].max(m_blk, mode="drop"))
        alpha, w = jnp.exp(m - m_new), jnp.exp(m_blk - m_new[safe])
        l = l * alpha + jnp.zeros_like(l).at[sid].add(p.sum(-1, keepdims=True) * w, mode="drop")
        acc = acc * alpha + jnp.zeros_like(acc).at[sid].add(pv * w, mode="drop")
        return m_new, l, acc

    state = jax.lax.fori_loop(0, -(-total // pages_per_block), body,
                              _init_state((max_seqs, num_kv_heads, group), head_dim))
    return _finish(state)


def _lone_decode(q, k_pages, v_pages, md, q_len, *, sm_scale, sliding_window, pages_per_block):
    """Attention of a one-row step (f32[1, K, G, D]): sequence 0's decode over its own pages, a
    block at a time, or zeros when the row is padding. The general decode path's page list and
    its per-block segment merges cost one stream of the default model ~1 ms per step
    (benchmarks/cpu_peer.md); a lone row needs neither."""
    num_kv_heads, _, page_size, head_dim = k_pages.shape
    group = q.shape[1] // num_kv_heads
    block = pages_per_block * page_size
    live = (md.num_seqs[0] > 0) & (q_len[0] == 1)
    kv_len = jnp.where(live, md.kv_lens[0], 0)
    qr = q[0].reshape(num_kv_heads, group, head_dim)
    table = md.page_indices[0]  # padded to whole blocks (page 0, masked) so no slice is clamped
    table = jnp.pad(table, (0, -table.shape[0] % pages_per_block))

    def body(j, state):
        pages = jax.lax.dynamic_slice_in_dim(table, j * pages_per_block, pages_per_block)
        k_blk = k_pages[:, pages].reshape(num_kv_heads, block, head_dim)  # [K, L, D]
        v_blk = v_pages[:, pages].reshape(num_kv_heads, block, head_dim)
        key_pos = j * block + jnp.arange(block)
        mask = key_pos < kv_len
        if sliding_window is not None:
            mask &= key_pos > kv_len - 1 - sliding_window
        v_blk = jnp.where(mask[None, :, None], v_blk, 0)  # garbage in unused slots stays out
        scores = jnp.einsum("kgd,kld->kgl", qr, k_blk, preferred_element_type=jnp.float32) * sm_scale
        return _online_update(state, scores, mask[None, None], v_blk, "kgl,kld->kgd")

    first = 0
    if sliding_window is not None:
        first = jnp.maximum(kv_len - sliding_window, 0) // block
    state = jax.lax.fori_loop(first, -(-kv_len // block), body, _init_state((num_kv_heads, group), head_dim))
    return _finish(state)[None]


def _chunk_tiles(q, k_pages, v_pages, md, q_len, *, sm_scale, sliding_window, q_tile,
                 pages_per_block, min_len=2, max_len=None, out0=None):
    """Attention of the rows of every sequence with min_len <= q_len (<= max_len), q_tile rows of
    one sequence at a time, written into out0 (f32[T + pad, K, G, D], pad >= q_tile; zeros if
    None). Returns it: rows of no such sequence keep what they had."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    block = pages_per_block * page_size
    tiles, ends = _tile_counts(md, q_len, q_tile, min_len, max_len)
    num_items = ends[-1]
    if out0 is None:
        out0 = jnp.zeros((num_tokens + q_tile, num_kv_heads, group, head_dim), jnp.float32)
    pad = out0.shape[0] - num_tokens
    qp = jnp.pad(q, ((0, pad), (0, 0), (0, 0))).reshape(num_tokens + pad, num_kv_heads, group, head_dim)
    tree_bits = md.tree_bits
    if tree_bits is not None:  # i32[T + pad, W], padded like qp
        tree_bits = jnp.pad(tree_bits, ((0, pad), (0, 0)), constant_values=-1)

    def item(i, out):
        seq, start, n_rows, first_pos = _locate_tile(i, tiles, ends, md, q_len, q_tile)
        q_pos = first_pos + jnp.arange(q_tile)  # i32[Q]
        rows_ok = jnp.arange(q_tile) < n_rows
        qt = jax.lax.dynamic_slice_in_dim(qp, start, q_tile)  # [Q, K, G, D]
        qt = jnp.transpose(qt, (1, 0, 2, 3)).reshape(num_kv_heads, q_tile * group, head_dim)  # [K, Q*G, D]
        kv_end = first_pos + n_rows  # keys past the tile's last row are never needed (causal)
        row_pos = jnp.repeat(q_pos, group)  # i32[Q*G], the position of each (row, head in group)
        row_ok = jnp.repeat(rows_ok, group)
        if tree_bits is not None:
            bits = jax.lax.dynamic_slice_in_dim(tree_bits, start, q_tile)  # i32[Q, W]
            words = [jnp.repeat(bits[:, w], group) for w in range(bits.shape[1])]  # i32[Q*G] each
            new_start = md.kv_lens[seq] - q_len[seq]  # the sequence's first new slot

        def body(j, state):
            pages = jax.lax.dynamic_slice_in_dim(md.page_indices[seq], j * pages_per_block, pages_per_block)
            k_blk = k_pages[:, pages].reshape(num_kv_heads, block, head_dim)  # [K, L, D]
            v_blk = v_pages[:, pages].reshape(num_kv_heads, block, head_dim)
            key_pos = j * block + jnp.arange(block)[None, :]  # [1, L]
            mask = (key_pos <= row_pos[:, None]) & (key_pos < kv_end) & row_ok[:, None]  # [Q*G, L]
            if sliding_window is not None:
                mask &= key_pos > row_pos[:, None] - sliding_window
            if tree_bits is not None:
                mask &= tree_visible(words, key_pos - new_start)
            v_blk = jnp.where((key_pos[0] < kv_end)[None, :, None], v_blk, 0)
            scores = jnp.einsum("kmd,kld->kml", qt, k_blk, preferred_element_type=jnp.float32) * sm_scale
            return _online_update(state, scores, mask[None], v_blk, "kml,kld->kmd")

        first = 0
        if sliding_window is not None:
            first = jnp.maximum(first_pos - sliding_window + 1, 0) // block
        state = jax.lax.fori_loop(first, -(-kv_end // block), body,
                                  _init_state((num_kv_heads, q_tile * group), head_dim))
        tile_out = jnp.transpose(_finish(state).reshape(num_kv_heads, q_tile, group, head_dim), (1, 0, 2, 3))
        old = jax.lax.dynamic_slice_in_dim(out, start, q_tile)
        new = jnp.where(rows_ok[:, None, None, None], tile_out, old)
        return jax.lax.dynamic_update_slice_in_dim(out, new, start, axis=0)

    return jax.lax.fori_loop(0, num_items, item, out0)


def _tile_counts(md, q_len, q_tile, min_len, max_len):
    """(tiles, ends), i32[S] each: how many q_tile-row tiles each sequence with min_len <= q_len
    (<= max_len) has (0 for the others), and their running total (item i of the tile loop
    belongs to the first sequence whose end is past i)."""
    max_seqs = md.kv_lens.shape[0]
    live = (jnp.arange(max_seqs) < md.num_seqs[0]) & (q_len >= min_len)
    if max_len is not None:
        live &= q_len <= max_len
    tiles = jnp.where(live, -(-q_len // q_tile), 0)  # i32[S]
    return tiles, jnp.cumsum(tiles)


def _locate_tile(i, tiles, ends, md, q_len, q_tile):
    """Where item i of the tile loop sits: its sequence, its first row in q, how many rows it
    has (<= q_tile) and the position of its first row in the sequence (i32 scalars)."""
    seq = jnp.searchsorted(ends, i, side="right")
    tile = i - (ends[seq] - tiles[seq])
    start = md.cu_q_lens[seq] + tile * q_tile
    n_rows = jnp.minimum(q_tile, md.cu_q_lens[seq + 1] - start)
    first_pos = md.kv_lens[seq] - q_len[seq] + tile * q_tile
    return seq, start, n_rows, first_pos


def paged_attention(q, k_pages, v_pages, md: AttentionMetadata, *, sm_scale: float,
                    sliding_window: int | None = None, q_tile: int = 64, kv_block: int = 64,
                    decode_block: int = 2048, decode_block_per_seq: int = 64, short_tile: int = 8,
                    short_len: int = 16):
    """Causal attention of flat queries (f[T, num_heads, head_dim]) over their sequences' pages
    (this step's keys already written), restricted to each row's draft tree where md.tree_bits
    is given (not with sliding_window: ValueError). Rows of padding tokens come back as zeros.

    q_tile: query rows per chunk tile; kv_block: keys per block of a tile, decode_block: keys per
    block of the decodes' page list, at most decode_block_per_seq per sequence of the bucket (all
    rounded to whole pages; on 2 CPU cores one stream of the 135M default model took 44 ms per
    token at 64 keys per sequence against 59 ms at 2048, benchmarks/cpu_peer.md). The defaults were the fastest
    on a 2-core x86 CPU for a 26M-parameter model (benchmarks/engine.md). Sequences of 2 to
    short_len new tokens (a decode with its speculative draft) take tiles of short_tile rows:
    a q_tile-row tile would compute mostly padding for them.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    max_seqs, pages_per_seq = md.page_indices.shape
    static_validate_tree_bits(md.tree_bits, num_tokens, sliding_window=sliding_window)
    pages_per_block = max(1, kv_block // page_size)
    # Pad the page table to whole blocks so a block's slice never runs past it (the padded
    # entries point at page 0 and are masked by length).
    padded = -(-pages_per_seq // pages_per_block) * pages_per_block
    md = AttentionMetadata(jnp.asarray(md.cu_q_lens), jnp.asarray(md.kv_lens),
                           jnp.pad(md.page_indices, ((0, 0), (0, padded - pages_per_seq))),
                           jnp.asarray(md.num_seqs), md.decode_only,
                           None if md.tree_bits is None else jnp.asarray(md.tree_bits))
    q_len = md.cu_q_lens[1:] - md.cu_q_lens[:-1]  # i32[S]
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window)
    # Keys per block of the decodes' page list: decode_block for a full batch, fewer for a few
    # sequences (a lone decode would otherwise gather and mask decode_block keys per step).
    decode_keys = min(decode_block, max(page_size, decode_block_per_seq * max_seqs))
    if num_tokens == 1:  # its one row is a decode or padding: no chunk tiles, no page list
        out = _lone_decode(q, k_pages, v_pages, md, q_len, pages_per_block=max(1, decode_keys // page_size), **kw)
        return out.reshape(1, num_heads, head_dim).astype(q.dtype)
    live = jnp.arange(max_seqs) < md.num_seqs[0]
    group = num_heads // num_kv_heads

    def chunks():
        out = _chunk_tiles(q, k_pages, v_pages, md, q_len, q_tile=q_tile, pages_per_block=pages_per_block,
                           min_len=short_len + 1, **kw)
        return _chunk_tiles(q, k_pages, v_pages, md, q_len, q_tile=short_tile, pages_per_block=pages_per_block,
                            min_len=2, max_len=short_len, out0=out, **kw)

    # Each part runs only when the step has rows of its kind: a decode step skips the chunk
    # tiles' set-up (padding q, the output buffer), which cost a lone decode ~0.2 ms per layer.
    out = jax.lax.cond(jnp.any(live & (q_len >= 2)), chunks,
                       lambda: jnp.zeros((num_tokens + q_tile, num_kv_heads, group, head_dim), jnp.float32))
    is_dec = live & (q_len == 1)

    def decodes(out):
        dec = _decode_rows(q, k_pages, v_pages, md, q_len, pages_per_block=max(1, decode_keys // page_size), **kw)
        rows = jnp.where(is_dec, md.cu_q_lens[:max_seqs], num_tokens + q_tile)  # out of range: dropped
        return out.at[rows].set(dec, mode="drop")

    out = jax.lax.cond(jnp.any(is_dec), decodes, lambda out: out, out)
    return out[:num_tokens].reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


class XlaBackend:
    """AttentionBackend in plain jnp: scatter the new K/V into their pages, then attend over
    pages (`paged_attention`), decodes and chunks in one program."""

    decode_path = False

    def __call__(self, q, k, v, k_pages, v_pages, md, *, sm_scale, sliding_window):
        k_pages, v_pages = write_kv(k_pages, v_pages, k, v, md)
        out = paged_attention(q, k_pages, v_pages, md, sm_scale=sm_scale, sliding_window=sliding_window)
        return out, k_pages, v_pages
