"""The ragged batch description every attention backend reads."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

TREE_WORDS = 2
"""i32 words per row of AttentionMetadata.tree_bits."""
MAX_TREE_TOKENS = 32 * TREE_WORDS
"""New tokens of one sequence a tree can shape; later ones are plain causal."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where each sequence's new tokens sit in the flat token axis and in the page pool.

    Tokens of sequence s occupy rows cu_q_lens[s]:cu_q_lens[s+1] of the flat batch and are the
    last q_len of its kv_lens[s] tokens (earlier ones are already cached). Rows past
    cu_q_lens[num_seqs] and sequences past num_seqs are padding: they write nothing.

    Tree attention (speculative decoding with a draft tree): tree_bits[t] says which of its
    sequence's new tokens row t sees. Bit j (word j // 32, bit j % 32) is set iff new token j
    (counted from row cu_q_lens[s]) is an ancestor of t or t itself. Cached keys are always
    seen, the causal rule (j <= t's own index) still applies, and new tokens j >=
    MAX_TREE_TOKENS are always seen, so a row of -1s is plain causal. A row must see itself.
    None: no trees in the step (plain causal everywhere, the compiled code of a step without
    the field). Trees cannot be combined with a sliding window (the backends raise ValueError).
    """

    cu_q_lens: jax.Array  # i32[max_seqs + 1]
    kv_lens: jax.Array  # i32[max_seqs], cached + new tokens
    page_indices: jax.Array  # i32[max_seqs, pages_per_seq]
    num_seqs: jax.Array  # i32[1]
    # Static: every sequence has exactly one new token (cu_q_lens[s] == s). Backends may take a
    # decode-specialised path; a jitted step compiles once per value.
    decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))
    tree_bits: jax.Array | None = None  # i32[T, TREE_WORDS], T = the step's token rows

    @classmethod
    def from_lengths(cls, q_lens, kv_lens, page_indices, *, max_seqs: int | None = None,
                     parents: Sequence[Sequence[int] | None] | None = None,
                     num_tokens: int | None = None) -> "AttentionMetadata":
        """Builds padded host arrays from per-sequence lengths and page lists (test/tool helper).

        parents: per sequence, None (plain causal) or the parent of each new token (see
        tree_bits_from_parents); None for all: no tree_bits. num_tokens: rows of tree_bits (the
        step's T, padding included); defaults to sum(q_lens).
        """
        n = len(q_lens)
        max_seqs = max_seqs or n
        pages_per_seq = max((len(p) for p in page_indices), default=1) or 1
        cu = np.zeros(max_seqs + 1, np.int32)
        cu[1:n + 1] = np.cumsum(q_lens)
        cu[n + 1:] = cu[n]
        kv = np.zeros(max_seqs, np.int32)
        kv[:n] = kv_lens
        table = np.zeros((max_seqs, pages_per_seq), np.int32)
        for s, pages in enumerate(page_indices):
            table[s, :len(pages)] = pages
        tree_bits = None
        if parents is not None and any(p is not None for p in parents):
            tree_bits = tree_bits_from_parents(q_lens, parents, num_tokens or int(cu[n]))
        return cls(cu, kv, table, np.array([n], np.int32),
                   decode_only=n > 0 and all(q == 1 for q in q_lens) and tree_bits is None,
                   tree_bits=tree_bits)

    @staticmethod
    def tree_bits_from_parents(q_lens, parents_per_seq, num_rows: int) -> np.ndarray:
        """See tree_bits_from_parents."""
        return tree_bits_from_parents(q_lens, parents_per_seq, num_rows)


def tree_bits_from_parents(q_lens: Sequence[int], parents_per_seq: Sequence[Sequence[int] | None],
                           num_rows: int) -> np.ndarray:
    """AttentionMetadata.tree_bits (i32[num_rows, TREE_WORDS]) from per-sequence parent lists.

    q_lens: new tokens per sequence, in row order. parents_per_seq[s]: None (the sequence is
    plain causal: a prefill chunk or a decode) or q_lens[s] parents, one per new token:
    parents[i] in [-1, i), -1 meaning no new-token ancestor (token 0 of a speculating sequence
    is the root, the request's last known token, and the draft tokens hang below it). Rows of
    plain sequences and padding rows (past sum(q_lens)) are all -1.
    """
    if len(parents_per_seq) != len(q_lens):
        raise ValueError(f"{len(parents_per_seq)} parent lists for {len(q_lens)} sequences")
    total = int(sum(q_lens))
    if num_rows < total:
        raise ValueError(f"{num_rows=} is fewer than the {total} new tokens of the batch")
    bits = np.full((num_rows, TREE_WORDS), -1, np.int32)
    row = 0
    for s, (q_len, parents) in enumerate(zip(q_lens, parents_per_seq)):
        if parents is not None:
            if len(parents) != q_len:
                raise ValueError(f"sequence {s}: {len(parents)} parents for q_len={q_len}")
            if q_len > MAX_TREE_TOKENS:
                raise ValueError(f"sequence {s}: a tree of {q_len} tokens exceeds "
                                 f"MAX_TREE_TOKENS={MAX_TREE_TOKENS}")
            seen: list[int] = []  # seen[i]: bit mask of token i's ancestors and itself
            for i, p in enumerate(parents):
                if not -1 <= p < i:
                    raise ValueError(f"sequence {s}: token {i} has parent {p}; parents must "
                                     f"come earlier (or be -1)")
                seen.append((1 << i) | (seen[p] if p >= 0 else 0))
            words = [[(m >> (32 * w)) & 0xFFFFFFFF for w in range(TREE_WORDS)] for m in seen]
            bits[row:row + q_len] = np.array(words, np.uint32).reshape(q_len, TREE_WORDS).view(np.int32)
        row += q_len
    return bits
