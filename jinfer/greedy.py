"""Greedy generation for a fixed batch through the paged cache: the minimal end-to-end path.

Pages are handed out per sequence from a shuffled list, so every run exercises non-contiguous
page tables. The continuous-batching engine supersedes this for serving.
"""

from __future__ import annotations

import numpy as np

from jinfer.attention import AttentionMetadata
from jinfer.kv_cache import KVCache
from jinfer.models.forward import jit_forward


def greedy_generate(model, prompts: list[list[int]], max_tokens: int, *, page_size: int = 16,
                    eos_ids: tuple[int, ...] = (), seed: int = 0) -> list[list[int]]:
    """Prefills all prompts in one ragged step, then decodes them together until max_tokens/EOS.

    Returns the generated ids per prompt (EOS included when hit).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_tokens <= 0:
        raise ValueError(f"{max_tokens=} must be > 0")
    cfg = model.config
    longest = max(len(p) for p in prompts) + max_tokens
    if longest > cfg.max_position_embeddings:
        raise ValueError(f"prompt + max_tokens = {longest} exceeds max_position_embeddings="
                         f"{cfg.max_position_embeddings}")
    pages_per_seq = -(-longest // page_size)
    perm = np.random.default_rng(seed).permutation(len(prompts) * pages_per_seq).astype(np.int32)
    tables = perm.reshape(len(prompts), pages_per_seq)
    cache = KVCache.create(cfg, len(perm), page_size, dtype=model.embed.get_value().dtype)
    fwd = jit_forward(model)

    lens = [len(p) for p in prompts]
    ids = np.concatenate([np.asarray(p, np.int32) for p in prompts])
    pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lens])
    md = AttentionMetadata.from_lengths(lens, lens, list(tables))
    last = np.cumsum(lens).astype(np.int32) - 1
    logits, cache = fwd(ids, pos, cache, md, last)

    out = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    kv_lens = np.asarray(lens, np.int32)
    ones = [1] * len(prompts)
    for _ in range(max_tokens):
        next_ids = np.asarray(logits.argmax(-1), np.int32)
        for i, t in enumerate(next_ids):
            if not done[i]:
                out[i].append(int(t))
                done[i] = int(t) in eos_ids or len(out[i]) == max_tokens
        if done.all():
            break
        positions = kv_lens.copy()
        kv_lens = kv_lens + 1
        md = AttentionMetadata.from_lengths(ones, kv_lens, list(tables))
        logits, cache = fwd(next_ids, positions, cache, md, np.arange(len(prompts), dtype=np.int32))
    return out
