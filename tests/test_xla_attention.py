"""The XLA attention backend against the pure-jnp reference: decodes, chunks and their mixes,
GQA, sliding windows, lengths around page edges, permuted page tables, NaN in unused slots."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jinfer.attention import AttentionMetadata
from jinfer.attention.xla import paged_attention
from pallas_kernels.reference import ragged_paged_attention_ref


def _batch(rng, q_lens, kv_lens, *, page, num_kv_heads, group, head_dim, extra_seqs, extra_tokens):
    """A ragged batch over a permuted, NaN-poisoned page pool (every slot no sequence owns)."""
    n = len(q_lens)
    pages_per_seq = max(-(-k // page) for k in kv_lens) + 1
    num_pages = sum(-(-k // page) for k in kv_lens) + 3
    perm = rng.permutation(num_pages)
    tables, at = [], 0
    for kv in kv_lens:
        tables.append(perm[at:at + -(-kv // page)].tolist())
        at += len(tables[-1])
    md = AttentionMetadata.from_lengths(q_lens, kv_lens, tables, max_seqs=n + extra_seqs)
    table = np.zeros((n + extra_seqs, pages_per_seq), np.int32)
    table[:, :md.page_indices.shape[1]] = md.page_indices
    md = AttentionMetadata(md.cu_q_lens, md.kv_lens, table, md.num_seqs)
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
