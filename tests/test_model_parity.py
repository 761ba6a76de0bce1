"""Numerical parity of the paged NNX decoder with HF transformers (PyTorch CPU, float32)."""

import numpy as np
import pytest

from jinfer.attention import AttentionMetadata
from jinfer.kv_cache import KVCache
from jinfer.loader.hf import load_hf_model
from tests import hf_models
from tests.model_forward import jit_forward

VARIANTS = list(hf_models.VARIANTS)
PAGE_SIZE = 4
TOL = 1e-4


def _prompts(seed, lengths, vocab=300):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def _page_tables(lengths, page_size, seed, num_pages=None):
    """Disjoint, randomly permuted pages per sequence (non-contiguous on purpose)."""
    need = [-(-n // page_size) for n in lengths]
    num_pages = num_pages or sum(need) + 3
    perm = np.random.default_rng(seed).permutation(num_pages)
    tables, at = [], 0
    for k in need:
        tables.append(perm[at:at + k].tolist())
        at += k
    return tables, num_pages


def _ragged_forward(model, prompts, fill=float("nan"), seed=0):
    lens = [len(p) for p in prompts]
    tables, num_pages = _page_tables(lens, PAGE_SIZE, seed)
    cache = KVCache.create(model.config, num_pages, PAGE_SIZE, fill=fill)
    md = AttentionMetadata.from_lengths(lens, lens, tables)
    ids = np.concatenate(prompts).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lens]).astype(np.int32)
    logits, _ = jit_forward(model)(ids, pos, cache, md)
    return np.split(np.asarray(logits), np.cumsum(lens)[:-1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_ragged_batch_logits_match_hf(hf_checkpoints, variant):
    path = hf_checkpoints[variant]
    model = load_hf_model(path)
    prompts = _prompts(1, [7, 1, 13, 21])  # 21 > mistral's sliding window of 8
    ours = _ragged_forward(model, prompts)
    for prompt, got in zip(prompts, ours):
        want = hf_models.hf_logits(path, prompt)
        assert np.abs(got - want).max() <= TOL, f"{variant} len={len(prompt)}"


@pytest.mark.parametrize("variant", ["llama3", "mistral"])
def test_token_by_token_decode_matches_full_forward(hf_checkpoints, variant):
    """Two sequences decode one token per step through permuted pages, interleaved in one batch."""
    model = load_hf_model(hf_checkpoints[variant])
    prompts = _prompts(2, [19, 11])
    full = _ragged_forward(model, prompts)
    lens = [len(p) for p in prompts]
    tables, num_pages = _page_tables(lens, PAGE_SIZE, seed=5)
    cache = KVCache.create(model.config, num_pages, PAGE_SIZE, fill=float("nan"))
    fwd = jit_forward(model)
    steps = [[] for _ in prompts]
    for t in range(max(lens)):
        live = [s for s in range(len(prompts)) if t < lens[s]]
        md = AttentionMetadata.from_lengths([1] * len(live), [t + 1] * len(live),
                                            [tables[s] for s in live], max_seqs=len(prompts))
        ids = np.array([prompts[s][t] for s in live], np.int32)
        logits, cache = fwd(ids, np.full(len(live), t, np.int32), cache, md)
        for row, s in enumerate(live):
            steps[s].append(np.asarray(logits[row]))
    for s in range(len(prompts)):
        assert np.abs(np.stack(steps[s]) - full[s]).max() <= TOL


def test_mixed_chunk_and_decode_batch_matches_full_forward(hf_checkpoints):
    """One step holds a decode token of sequence A and a prefill chunk of B that has a cached prefix."""
    model = load_hf_model(hf_checkpoints["qwen2"])
    a, b = _prompts(3, [10, 17])
    full_a, full_b = _ragged_forward(model, [a, b])
    tables, num_pages = _page_tables([10, 17], PAGE_SIZE, seed=7)
    cache = KVCache.create(model.config, num_pages, PAGE_SIZE, fill=float("nan"))
    fwd = jit_forward(model)
    # Step 1: A's first 9 tokens, B's first 6.
    md = AttentionMetadata.from_lengths([9, 6], [9, 6], tables)
    ids = np.array(a[:9] + b[:6], np.int32)
    pos = np.array(list(range(9)) + list(range(6)), np.int32)
    _, cache = fwd(ids, pos, cache, md)
    # Step 2: A's last token (decode) and B's remaining 11 (chunk at offset 6).
    md = AttentionMetadata.from_lengths([1, 11], [10, 17], tables)
    ids = np.array(a[9:] + b[6:], np.int32)
    pos = np.array([9] + list(range(6, 17)), np.int32)
    logits, _ = fwd(ids, pos, cache, md)
    logits = np.asarray(logits)
    assert np.abs(logits[0] - full_a[9]).max() <= TOL
    assert np.abs(logits[1:] - full_b[6:]).max() <= TOL


def test_nan_filled_unused_pages_do_not_change_outputs(hf_checkpoints):
    model = load_hf_model(hf_checkpoints["llama3"])
    prompts = _prompts(4, [5, 9, 2])
    clean = _ragged_forward(model, prompts, fill=0.0)
    poisoned = _ragged_forward(model, prompts, fill=float("nan"))
    for c, p in zip(clean, poisoned):
        assert np.isfinite(p).all()
        np.testing.assert_array_equal(c, p)


def test_padding_tokens_and_sequences_write_nothing(hf_checkpoints):
    """Bucketed batches carry padded rows/sequences; they must leave the pool untouched."""
    model = load_hf_model(hf_checkpoints["llama3"])
    cfg = model.config
    cache = KVCache.create(cfg, 6, PAGE_SIZE, fill=float("nan"))
    md = AttentionMetadata.from_lengths([3], [3], [[2]], max_seqs=4)
    ids = np.array([1, 2, 3, 0, 0, 0, 0, 0], np.int32)  # 5 padding rows
    pos = np.array([0, 1, 2, 0, 0, 0, 0, 0], np.int32)
    logits, cache = jit_forward(model)(ids, pos, cache, md)
    k = np.asarray(cache.k[0])
    assert np.isfinite(k[:, 2, :3]).all()
    untouched = np.delete(k, 2, axis=1)
    assert np.isnan(untouched).all() and np.isnan(k[:, 2, 3]).all()
    assert np.isfinite(np.asarray(logits)).all()


def test_bfloat16_load_tracks_float32(hf_checkpoints):
    import jax.numpy as jnp
    path = hf_checkpoints["llama2_bias"]
    prompts = _prompts(6, [12])
    f32 = _ragged_forward(load_hf_model(path), prompts)[0]
    model = load_hf_model(path, dtype=jnp.bfloat16)
    assert model.embed.get_value().dtype == jnp.bfloat16
    bf16 = _ragged_forward(model, prompts)[0]
    assert np.abs(bf16 - f32).max() < 0.25 * np.abs(f32).max()
    assert (bf16.argmax(-1) == f32.argmax(-1)).mean() >= 0.75
