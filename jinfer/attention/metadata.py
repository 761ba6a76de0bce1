"""The ragged batch description every attention backend reads."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where each sequence's new tokens sit in the flat token axis and in the page pool.

    Tokens of sequence s occupy rows cu_q_lens[s]:cu_q_lens[s+1] of the flat batch and are the
    last q_len of its kv_lens[s] tokens (earlier ones are already cached). Rows past
    cu_q_lens[num_seqs] and sequences past num_seqs are padding: they write nothing.
    """

    cu_q_lens: jax.Array  # i32[max_seqs + 1]
    kv_lens: jax.Array  # i32[max_seqs], cached + new tokens
    page_indices: jax.Array  # i32[max_seqs, pages_per_seq]
    num_seqs: jax.Array  # i32[1]
    # Static: every sequence has exactly one new token (cu_q_lens[s] == s). Backends may take a
    # decode-specialised path; a jitted step compiles once per value.
    decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @classmethod
    def from_lengths(cls, q_lens, kv_lens, page_indices, *, max_seqs: int | None = None,
                     ) -> "AttentionMetadata":
        """Builds padded host arrays from per-sequence lengths and page lists (test/tool helper)."""
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
        return cls(cu, kv, table, np.array([n], np.int32),
                   decode_only=n > 0 and all(q == 1 for q in q_lens))
