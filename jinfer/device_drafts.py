"""Drafts on the device: a step's draft trees as its sampling rows (DraftRows, built by the
runner's prepare), verified in the step program as jinfer.speculation.verify walks them on the
host (accepted_paths), and a tree's accepted path copied to the K/V slots plain decoding gives
its tokens (move_paths), so the next step can be planned before this one is read (drafts in
flight: jinfer/drafting.py, jinfer/runner.py's _step)."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.kv_cache import KVCache


class DraftRows(NamedTuple):
    """A drafts-variant step's sampling rows as draft trees (accepted_paths verifies them).
    Row j of a sequence with a draft samples after its draft token j - 1 (row 0: after its last
    known token, the root); padding rows are roots."""

    parent: np.ndarray  # i32[r]: the row sampling after this row's token's parent; -1: a root row
    token: np.ndarray  # i32[r]: the draft token a row holds (-1: a root row)
    move: np.ndarray | None
    """i32[2, r] where the step may hold tree drafts (None: chains only): the K/V slot each tree
    node was written at and the one its depth gives it on an accepted path, as offsets from its
    sequence's first new token (destination -1: the same slot)."""

    @classmethod
    def empty(cls, r: int, trees: bool) -> "DraftRows":
        return cls(np.full(r, -1, np.int32), np.full(r, -1, np.int32), np.full((2, r), -1, np.int32) if trees else None)

    def add(self, first: int, known: int, tokens: Sequence[int], parents: Sequence[int], depths: Sequence[int]):
        """A sequence's draft: its root row `first`, `known` new tokens before its draft, the
        draft's tokens, parents (() for a chain) and depths."""
        k = len(tokens)
        rows = slice(first + 1, first + 1 + k)
        self.parent[rows] = first + 1 + np.asarray(parents or range(-1, k - 1))
        self.token[rows] = tokens
        if parents and self.move is not None:
            src, dst = known + np.arange(k), known + np.asarray(depths) - 1
            self.move[0, rows] = src
            self.move[1, rows] = np.where(dst != src, dst, -1)


def accepted_paths(tokens, row_seq, draft_rows: DraftRows, max_depth: int, num_segments: int):
    """(whether each row is on its sequence's accepted path, each sequence's deepest such row,
    its draft tokens off the path) by verify's rule: from the root, at each node the first child
    whose token equals the model's sample there (rows are in topological order)."""
    n = tokens.shape[0]
    rows = jnp.arange(n)
    root = draft_rows.parent < 0
    parent = jnp.maximum(draft_rows.parent, 0)
    match = ~root & (tokens[parent] == draft_rows.token)
    first = jax.ops.segment_min(jnp.where(match, rows, n), parent, num_segments=n)
    match &= first[parent] == rows  # (a later sibling with the same token is never taken)
    acc = root
    for _ in range(max_depth):  # one level of the trees per pass
        acc = root | (match & acc[parent])
    deepest = jax.ops.segment_max(jnp.where(acc, rows, -1), row_seq, num_segments=num_segments)
    off_path = jax.ops.segment_sum((~root & ~acc).astype(jnp.int32), row_seq, num_segments=num_segments)
    return acc, deepest, off_path


def move_paths(kv: KVCache, md, row_seq, acc, move) -> KVCache:
    """Each accepted tree node's K/V from the slot the step wrote it at to the one its depth
    gives it (DraftRows.move), in the sequence's pages (md: after any shortfall's move back)."""
    table = md.page_indices
    seq = jnp.minimum(row_seq, table.shape[0] - 1)
    first = md.kv_lens[seq] - (md.cu_q_lens[seq + 1] - md.cu_q_lens[seq])  # the sequence's first new slot
    size, last_page = kv.page_size, table.shape[1] - 1

    def page(slot):
        return table[seq, jnp.clip(slot // size, 0, last_page)]
    src, dst = first + move[0], first + move[1]
    dst_page = jnp.where(acc & (move[1] >= 0), page(dst), kv.num_pages)  # (out of range: no move)
    return _move_kv(kv, page(src), src % size, dst_page, dst % size)


def _move_kv(kv: KVCache, src_page, src_slot, dst_page, dst_slot) -> KVCache:
    """i32[M] each; a move to a page past the pool is none. All sources are read before any
    destination is written (an accepted path's earlier destinations may be later sources)."""
    def move(pages):  # f[num_kv_heads, num_pages, page_size, head_dim]
        return pages.at[:, dst_page, dst_slot].set(pages[:, src_page, src_slot], mode="drop")
    return KVCache(tuple(move(k) for k in kv.k), tuple(move(v) for v in kv.v))
