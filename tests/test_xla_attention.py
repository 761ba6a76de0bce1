"""The XLA attention backend against the pure-jnp reference: decodes, chunks and their mixes,
GQA, sliding windows, draft trees, lengths around page edges, permuted page tables, NaN in
unused slots. The tree_bits helpers by hand."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jinfer.attention import MAX_TREE_TOKENS, TREE_WORDS, AttentionMetadata, tree_bits_from_parents
from jinfer.attention.xla import paged_attention
from pallas_kernels.reference import ragged_paged_attention_ref
from tests.test_pallas_kernels import tree_mix


def _batch(rng, q_lens, kv_lens, *, page, num_kv_heads, group, head_dim, extra_seqs, extra_tokens,
           parents=None):
    """A ragged batch over a permuted, NaN-poisoned page pool (every slot no sequence owns);
    parents: per-sequence draft trees (None: plain causal), as AttentionMetadata.from_lengths."""
    n = len(q_lens)
    pages_per_seq = max(-(-k // page) for k in kv_lens) + 1
    num_pages = sum(-(-k // page) for k in kv_lens) + 3
    perm = rng.permutation(num_pages)
    tables, at = [], 0
    for kv in kv_lens:
        tables.append(perm[at:at + -(-kv // page)].tolist())
        at += len(tables[-1])
    md = AttentionMetadata.from_lengths(q_lens, kv_lens, tables, max_seqs=n + extra_seqs, parents=parents,
                                        num_tokens=sum(q_lens) + extra_tokens)
    table = np.zeros((n + extra_seqs, pages_per_seq), np.int32)
    table[:, :md.page_indices.shape[1]] = md.page_indices
    md = AttentionMetadata(md.cu_q_lens, md.kv_lens, table, md.num_seqs, tree_bits=md.tree_bits)
    shape = (num_kv_heads, num_pages, page, head_dim)
    k_pages = np.full(shape, np.nan, np.float32)
    v_pages = np.full(shape, np.nan, np.float32)
    for pages, kv in zip(tables, kv_lens):
        for i, p in enumerate(pages):
            used = min(page, kv - i * page)
            k_pages[:, p, :used] = rng.standard_normal((num_kv_heads, used, head_dim))
            v_pages[:, p, :used] = rng.standard_normal((num_kv_heads, used, head_dim))
    q = rng.standard_normal((sum(q_lens) + extra_tokens, num_kv_heads * group, head_dim)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages), md


CASES = {
    "decodes": ([1, 1, 1, 1], [1, 15, 16, 17]),
    "chunks": ([16, 5, 33], [16, 20, 70]),
    "mixed": ([1, 7, 1, 12, 1], [9, 7, 40, 44, 64]),
    "fresh prompt, one token": ([1], [1]),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("group,page,window", [(1, 4, None), (2, 16, None), (4, 8, 6)])
def test_xla_attention_matches_reference(name, group, page, window):
    rng = np.random.default_rng(len(name) * 31 + group)
    q_lens, kv_lens = CASES[name]
    q, kp, vp, md = _batch(rng, q_lens, kv_lens, page=page, num_kv_heads=2, group=group, head_dim=16,
                           extra_seqs=2, extra_tokens=5)
    kw = dict(sm_scale=0.25, sliding_window=window)
    ref = ragged_paged_attention_ref(q, kp, vp, md.cu_q_lens, md.kv_lens, md.page_indices, md.num_seqs, **kw)
    # Small blocks and tiles so every loop runs several trips over these short sequences.
    out = jax.jit(lambda q, kp, vp, md: paged_attention(q, kp, vp, md, q_tile=4, kv_block=2 * page,
                                                        decode_block=2 * page, **kw))(q, kp, vp, md)
    real = sum(q_lens)
    assert np.isfinite(np.asarray(out)).all(), "NaN from an unused slot reached the output"
    np.testing.assert_allclose(np.asarray(out[:real]), np.asarray(ref[:real]), atol=2e-5, rtol=2e-5)
    assert not np.asarray(out[real:]).any(), "padding rows must come back as zeros"


@pytest.mark.parametrize("per_seq_pages", [1, 3])
def test_decode_blocks_sized_by_the_batch_give_the_same_rows(per_seq_pages):
    """decode_block_per_seq caps the decodes' block by the bucket's sequences: a one-page block
    per sequence walks the page list in many trips and gives the reference's rows."""
    rng = np.random.default_rng(per_seq_pages)
    q_lens, kv_lens = [1, 1, 1], [3, 30, 17]
    q, kp, vp, md = _batch(rng, q_lens, kv_lens, page=4, num_kv_heads=2, group=2, head_dim=16, extra_seqs=1,
                           extra_tokens=2)
    ref = ragged_paged_attention_ref(q, kp, vp, md.cu_q_lens, md.kv_lens, md.page_indices, md.num_seqs,
                                     sm_scale=0.25)
    out = jax.jit(lambda q, kp, vp, md: paged_attention(
        q, kp, vp, md, sm_scale=0.25, decode_block=2048, decode_block_per_seq=4 * per_seq_pages))(q, kp, vp, md)
    np.testing.assert_allclose(np.asarray(out[:3]), np.asarray(ref[:3]), atol=2e-5, rtol=2e-5)


def test_hand_worked_decode_value():
    """One query over two keys: softmax weights by hand."""
    q = jnp.array([[[1.0, 0.0]]])  # [T=1, heads=1, D=2]
    k = np.zeros((1, 1, 2, 2), np.float32)
    v = np.zeros((1, 1, 2, 2), np.float32)
    k[0, 0, 0], k[0, 0, 1] = [0.0, 0.0], [2.0, 0.0]  # scores 0 and 2 (scale 1)
    v[0, 0, 0], v[0, 0, 1] = [1.0, 0.0], [0.0, 1.0]
    md = AttentionMetadata.from_lengths([1], [2], [[0]])
    out = paged_attention(q, jnp.asarray(k), jnp.asarray(v), md, sm_scale=1.0)
    w = np.exp(2.0) / (1 + np.exp(2.0))
    np.testing.assert_allclose(np.asarray(out)[0, 0], [1 - w, w], rtol=1e-6)


def _attend(q, kp, vp, md, **kw):
    """The backend with small blocks and tiles, so every loop runs several trips."""
    page = kp.shape[2]
    return jax.jit(lambda q, kp, vp, md: paged_attention(q, kp, vp, md, kv_block=2 * page,
                                                        decode_block=2 * page, **kw))(q, kp, vp, md)


@pytest.mark.parametrize("group,page,q_tile", [(1, 4, 4), (2, 16, 16), (4, 8, 64)])
@pytest.mark.parametrize("seed", [0, 1])
def test_xla_tree_attention_matches_reference(group, page, q_tile, seed):
    # Trees of 1..MAX_TREE_TOKENS tokens (chains, stars, deep, wide, random, forests) in one step
    # with a prefill chunk longer than a tree, a decode and an empty sequence.
    rng = np.random.default_rng(seed * 100 + group * 10 + page)
    sizes = [1, 2, 5, 17, 32, 33, MAX_TREE_TOKENS] if seed == 0 else list(rng.integers(1, MAX_TREE_TOKENS + 1, 5))
    q_lens, kv_lens, parents = tree_mix(rng, sizes, page)
    q, kp, vp, md = _batch(rng, q_lens, kv_lens, page=page, num_kv_heads=2, group=group, head_dim=16,
                           extra_seqs=2, extra_tokens=5, parents=parents)
    assert md.tree_bits.shape == (q.shape[0], TREE_WORDS) and not md.decode_only
    ref = ragged_paged_attention_ref(q, kp, vp, md.cu_q_lens, md.kv_lens, md.page_indices, md.num_seqs,
                                     sm_scale=0.25, tree_bits=md.tree_bits)
    out = _attend(q, kp, vp, md, sm_scale=0.25, q_tile=q_tile)
    real = sum(q_lens)
    assert np.isfinite(np.asarray(out)).all(), "NaN from an unused slot reached the output"
    np.testing.assert_allclose(np.asarray(out[:real]), np.asarray(ref[:real]), atol=2e-5, rtol=2e-5)
    assert not np.asarray(out[real:]).any(), "padding rows must come back as zeros"


def test_xla_chain_trees_and_all_set_bits_equal_causal_attention():
    rng = np.random.default_rng(5)
    q_lens, kv_lens = [1, 7, 40, 3], [9, 7, 50, 21]
    q, kp, vp, md = _batch(rng, q_lens, kv_lens, page=8, num_kv_heads=2, group=2, head_dim=16,
                           extra_seqs=1, extra_tokens=3, parents=[list(range(-1, n - 1)) for n in q_lens])
    no_tree = AttentionMetadata(md.cu_q_lens, md.kv_lens, md.page_indices, md.num_seqs)
    all_set = AttentionMetadata(md.cu_q_lens, md.kv_lens, md.page_indices, md.num_seqs,
                                tree_bits=np.full_like(md.tree_bits, -1))
    causal = np.asarray(_attend(q, kp, vp, no_tree, sm_scale=0.25, q_tile=4))
    for tree_md in (md, all_set):
        np.testing.assert_allclose(np.asarray(_attend(q, kp, vp, tree_md, sm_scale=0.25, q_tile=4)), causal,
                                   atol=2e-6, rtol=2e-6)


def test_tree_with_sliding_window_is_refused():
    rng = np.random.default_rng(0)
    q, kp, vp, md = _batch(rng, [3], [5], page=4, num_kv_heads=1, group=1, head_dim=8, extra_seqs=0,
                           extra_tokens=0, parents=[[-1, 0, 0]])
    with pytest.raises(ValueError, match="tree_bits with sliding_window=4 is not supported"):
        paged_attention(q, kp, vp, md, sm_scale=1.0, sliding_window=4)


def test_tree_bits_from_parents_by_hand():
    # Sequence 0 is a plain 2-token chunk (rows of -1s); sequence 1 a root with children 1 and 2
    # and a grandchild 3 under 2; then two padding rows.
    bits = tree_bits_from_parents([2, 4], [None, [-1, 0, 0, 2]], 8)
    assert bits.dtype == np.int32 and bits.shape == (8, TREE_WORDS)
    np.testing.assert_array_equal(bits[:, 0], [-1, -1, 0b1, 0b11, 0b101, 0b1101, -1, -1])
    np.testing.assert_array_equal(bits[:, 1], [-1, -1, 0, 0, 0, 0, -1, -1])
    # A chain of MAX_TREE_TOKENS: word edges. Row 31 fills word 0; row 63 sets every bit.
    chain = tree_bits_from_parents([MAX_TREE_TOKENS], [list(range(-1, MAX_TREE_TOKENS - 1))], MAX_TREE_TOKENS)
    np.testing.assert_array_equal(chain[[0, 30, 31, 32, 63]],
                                  [[1, 0], [2**31 - 1, 0], [-1, 0], [-1, 1], [-1, -1]])
    # A root's own bit only (parent -1 later in the tree: a second root).
    np.testing.assert_array_equal(tree_bits_from_parents([3], [[-1, -1, 1]], 3)[:, 0], [1, 2, 6])
    md = AttentionMetadata.from_lengths([1, 1], [4, 6], [[0], [1]], parents=[[-1], None], num_tokens=4)
    assert not md.decode_only and md.tree_bits.shape == (4, TREE_WORDS)
    md = AttentionMetadata.from_lengths([1, 1], [4, 6], [[0], [1]], parents=[None, None])
    assert md.decode_only and md.tree_bits is None


@pytest.mark.parametrize("args, message", [
    (([3], [[-1, 0]], 3), r"sequence 0: 2 parents for q_len=3"),
    (([2], [[-1, 1]], 2), r"sequence 0: token 1 has parent 1; parents must come earlier"),
    (([2], [[0, -1]], 2), r"sequence 0: token 0 has parent 0"),
    (([MAX_TREE_TOKENS + 1], [[-1] * (MAX_TREE_TOKENS + 1)], 70), r"exceeds MAX_TREE_TOKENS=64"),
    (([2, 2], [None], 4), r"1 parent lists for 2 sequences"),
    (([2, 2], [None, None], 3), r"num_rows=3 is fewer than the 4 new tokens"),
])
def test_tree_bits_from_parents_names_the_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        tree_bits_from_parents(*args)


@pytest.mark.parametrize("kv_len,window,block_pages", [(1, None, 1), (17, None, 1), (30, None, 3), (30, 6, 1),
                                                       (31, 9, 2), (62, None, 5), (62, 11, 5)])
def test_a_one_row_step_matches_reference(kv_len, window, block_pages):
    """A step of one token row takes its own decode path (no page list): the reference's row,
    over several block trips, blocks that do not divide the page table, NaN-poisoned free
    slots and a sliding window; a padding row (no sequence) comes back as zeros."""
    rng = np.random.default_rng(kv_len)
    q, kp, vp, md = _batch(rng, [1], [kv_len], page=4, num_kv_heads=2, group=3, head_dim=16, extra_seqs=1,
                           extra_tokens=0)
    kw = dict(sm_scale=0.25, sliding_window=window)
    ref = ragged_paged_attention_ref(q, kp, vp, md.cu_q_lens, md.kv_lens, md.page_indices, md.num_seqs, **kw)
    attend = jax.jit(lambda q, kp, vp, md: paged_attention(q, kp, vp, md, kv_block=4, decode_block=4 * block_pages,
                                                           decode_block_per_seq=4 * block_pages, **kw))
    out = attend(q, kp, vp, md)
    assert out.shape == q.shape and np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref[:1]), atol=2e-5, rtol=2e-5)
    empty = AttentionMetadata(md.cu_q_lens * 0, md.kv_lens * 0, md.page_indices, md.num_seqs * 0)
    assert not np.asarray(attend(q, kp, vp, empty)).any(), "a padding row must come back as zeros"
