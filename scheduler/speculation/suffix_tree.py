"""Counted, depth-capped suffix trees over token sequences (SuffixDecoding, Oliaro et al., NeurIPS'25).

What it holds. For every sequence and every start position s, the suffix seq[s:] cut to
`max_depth` tokens is a path from the root. A node's count is how many of those paths pass
through it: how many times its token path occurs (length <= max_depth) in the sequences. A pattern
P followed by X then has path probability count(P + X) / count(P), the product of child/parent
count ratios along the path, which is what drafting (`speculate`, suffix_draft.py) ranks by.

How. Edges are compressed: a node holds the tokens from its parent's end to its own end, all with
the node's count, as a window into one sequence that contains the node's whole path
(`seq[start : start + depth]`). A suffix still being extended (one of a sequence's last
max_depth) ends on a node boundary, so extending it bumps one whole node, as in the reference
implementation (ArcticInference's suffix tree). One change makes novel text cheap in Python: a
suffix alone in its leaf (count 1) is not tracked; the leaf is "open" (`depth == -1`) and grows
with its sequence for free, as leaves do in Ukkonen's algorithm. Only suffixes inside repeated
text cost work per token (up to max_depth of them), and they must: each bumps a different count.

A node object keeps the path that ends at its end for life: splits insert a new node above it,
fusing a node into its only child hands the child the node's start. So a position (node, depth)
kept outside the tree stays right after the tree changes if one walks up to the node whose range
holds the depth, or follows `forward` from a node fused away; a deleted node has count 0 and no
forward (`TailMatcher`, tail_matcher.py, does this).
"""

from __future__ import annotations

import bisect
import operator
from typing import Iterable, Sequence

from scheduler.speculation.suffix_draft import NO_SUFFIX_DRAFT, SuffixDraft, spec_budget, speculate
from scheduler.speculation.tail_matcher import TailMatcher

# Drafting (suffix_draft.py) and TailMatcher (tail_matcher.py) are importable from here too.
__all__ = ["NO_SUFFIX_DRAFT", "Position", "SuffixDraft", "SuffixTree", "TailMatcher", "spec_budget", "speculate"]

_START = operator.itemgetter(0)


class _Node:
    __slots__ = ("count", "children", "parent", "seq", "sid", "start", "depth", "ends", "forward")

    def __init__(self, count: int, parent: "_Node | None", seq: list, sid: int, start: int, depth: int):
        self.count = count
        self.children: dict[int, _Node] = {}
        self.parent = parent
        self.seq = seq          # a sequence holding this node's path at seq[start : start + depth]
        self.sid = sid          # its id
        self.start = start
        self.depth = depth      # tokens from the root to this node's end; -1: open leaf (see end())
        self.ends: dict[int, int] | None = None  # seq id -> start of one of its suffixes ending here
        self.forward: _Node | None = None        # set when fused into this node (count 0 then)

    def end(self, max_depth: int) -> int:
        d = self.depth
        return d if d >= 0 else min(len(self.seq) - self.start, max_depth)

    def __repr__(self):
        return f"_Node(count={self.count}, depth={self.depth}, children={sorted(self.children)})"


Position = tuple  # (node, m): the end of an m-token path, inside node's edge (parent end < m <= node end)


class SuffixTree:
    """Suffix trie of a set of token sequences, capped at max_depth, with occurrence counts.

    Sequences are named by int ids; `extend` appends tokens to one (new or existing), `remove`
    drops a whole sequence (only when `removable`: it needs per-node endpoint records, which a
    per-request tree can skip). Costs: appending a token is O(1) plus O(suffixes of the last
    max_depth tokens that end inside repeated text); removing a sequence of n tokens is O(n * edges
    per path).
    """

    def __init__(self, max_depth: int = 64, removable: bool = True):
        if max_depth < 1:
            raise ValueError(f"max_depth={max_depth} must be >= 1")
        self.max_depth = max_depth
        self.removable = removable
        self.root = _Node(0, None, [], -1, 0, 0)
        self.version = 0
        """Bumped by every change; positions kept outside the tree check it."""
        self._seqs: dict[int, list[int]] = {}
        # seq id -> [[start, node], ...] in ascending start: its suffixes still being extended
        # that end on an internal node (the others sit in open leaves or reached max_depth).
        self._active: dict[int, list[list]] = {}

    # -- contents ---------------------------------------------------------------------------

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def sequence(self, seq_id: int) -> list[int]:
        """The tokens of a sequence (the tree's own list: read it, never change it)."""
        return self._seqs[seq_id]

    def num_tokens(self) -> int:
        return self.root.count

    # -- updates ----------------------------------------------------------------------------

    def append(self, seq_id: int, token: int) -> None:
        self.extend(seq_id, (token,))

    def extend(self, seq_id: int, tokens: Iterable[int]) -> None:
        """Append tokens (ints) to a sequence, creating it if new."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            seq = self._seqs[seq_id] = []
            self._active[seq_id] = []
        self._active[seq_id] = self._grow(seq, seq_id, self._active[seq_id], tokens)
        self.version += 1

    def _grow(self, seq: list[int], seq_id: int, active: list[list], tokens: Iterable[int]) -> list[list]:
        """Appends tokens to seq, moving its tracked suffixes (`_active`) over each; returns
        those still tracked."""
        md, root, track = self.max_depth, self.root, self.removable
        for t in tokens:
            seq.append(t)
            n = len(seq)
            root.count += 1
            active.append([n - 1, root])
            kept = []
            # Longest suffix first, as the reference does: in periodic text a shorter suffix's path
            # can be a prefix of a longer one's, and the count tests below assume this order.
            for item in active:
                s, node = item
                d1 = n - s  # the suffix's length with t (node.depth == d1 - 1)
                child = node.children.get(t)
                if child is None:
                    self._leave(node, t, seq, seq_id, s)
                    continue
                cend = child.depth
                if cend < 0:
                    cend = len(child.seq) - child.start
                    if cend > md:
                        cend = md
                    if cend == d1:
                        self._close(child, cend, seq_id)
                if node.count == child.count + 1 and node is not root:
                    # This suffix is node's only endpoint and child its only child: once the suffix
                    # moves on, node's boundary would mark nothing, so it moves down with it.
                    if cend > d1:  # the common case in repeated text (so inline)
                        children = node.children
                        del children[t]
                        children[child.seq[child.start + d1]] = child
                        node.depth = d1
                        if node.start != s or node.seq is not seq:
                            node.seq, node.sid, node.start = seq, seq_id, s
                        if d1 < md:
                            kept.append(item)
                        continue
                    target = _fuse_into_child(node, child, seq, s)
                elif cend == d1:
                    child.count += 1
                    target = child
                else:
                    target = _split(node, child, t, seq, seq_id, s, d1)
                if track:
                    if node is not root and node.count:
                        del node.ends[seq_id]
                    if target.ends is None:
                        target.ends = {}
                    target.ends[seq_id] = s
                if d1 < md:
                    item[1] = target
                    kept.append(item)
            active = kept
        return active

    def _leave(self, node: _Node, t: int, seq: list[int], seq_id: int, s: int) -> None:
        """The suffix seq[s:] (ending at node) continues with t, which no child of node starts
        with: from here it is alone in a leaf, open and untracked."""
        if self.removable and node is not self.root:
            del node.ends[seq_id]
        if node.count == 1 and node is not self.root:
            # Alone at a leaf: the leaf becomes open and grows with this sequence.
            node.depth, node.seq, node.sid, node.start = -1, seq, seq_id, s
        else:
            node.children[t] = _Node(1, node, seq, seq_id, s, -1)

    def _close(self, leaf: _Node, depth: int, seq_id: int) -> None:
        """Another suffix reaches an open leaf's current end: fix the leaf's length and track its
        own suffix again (it now ends on a boundary)."""
        leaf.depth = depth
        if self.removable:
            leaf.ends = {leaf.sid: leaf.start}
        if depth < self.max_depth:
            # Only another sequence's leaf can be caught up with before max_depth.
            assert leaf.sid != seq_id
            bisect.insort(self._active[leaf.sid], [leaf.start, leaf], key=_START)

    def remove(self, seq_id: int) -> None:
        """Drop a sequence: every count its suffixes added, nodes left empty, boundaries left
        meaningless, and every reference into its token list."""
        if not self.removable:
            raise ValueError("this SuffixTree was built with removable=False")
        if seq_id not in self._seqs:
            raise ValueError(f"seq_id={seq_id} is not in the tree")
        seq = self._seqs.pop(seq_id)
        del self._active[seq_id]
        md, root, n = self.max_depth, self.root, len(seq)
        stale: dict[int, _Node] = {}  # surviving nodes whose window is into seq
        for s in range(n):
            depth = min(n - s, md)
            root.count -= 1
            node, d = root, 0
            while d < depth:
                key = seq[s + d]
                child = node.children[key]
                child.count -= 1
                if child.count == 0:
                    del node.children[key]
                    _kill(child)
                    break
                node, d = child, child.depth
                assert d >= 0, "an open leaf has count 1"
                if child.seq is seq:
                    stale[id(child)] = child
            else:
                assert d == depth
                if node is not root and node.ends:  # (suffixes capped at max_depth may share it)
                    node.ends.pop(seq_id, None)
                    if not node.ends:
                        node.ends = None
            if node is not root and len(node.children) == 1:
                child = next(iter(node.children.values()))
                if child.count == node.count:  # no endpoint left between them: fuse
                    parent = node.parent
                    parent.children[node.seq[node.start + parent.depth]] = child
                    child.parent = parent
                    node.count, node.forward = 0, child
        # Point the survivors at another occurrence of their path, deepest first so a node can
        # borrow a (fixed) child's window; a leaf borrows one of the suffixes that end at it.
        for node in sorted(stale.values(), key=lambda x: x.depth, reverse=True):
            if node.count == 0 or node.seq is not seq:
                continue
            if node.children:
                src = next(iter(node.children.values()))
                assert src.seq is not seq
                node.seq, node.sid, node.start = src.seq, src.sid, src.start
            else:
                sid, start = next(iter(node.ends.items()))
                node.seq, node.sid, node.start = self._seqs[sid], sid, start
        self.version += 1

    # -- queries ----------------------------------------------------------------------------

    def find(self, path: Sequence[int]) -> Position | None:
        """The position at the end of `path` (any length <= max_depth), or None if absent."""
        path = list(path)
        n, node, d = len(path), self.root, 0
        if n > self.max_depth:
            return None
        while d < n:
            child = node.children.get(path[d])
            if child is None:
                return None
            k = min(child.end(self.max_depth), n)
            if child.seq[child.start + d:child.start + k] != path[d:k]:
                return None
            node, d = child, k
        return node, n

    def count(self, path: Sequence[int]) -> int:
        """How many times `path` occurs in the sequences (0 if longer than max_depth)."""
        pos = self.find(path)
        return 0 if pos is None else pos[0].count

    def match(self, pattern: Sequence[int]) -> list[Position]:
        """Positions of pattern's last m tokens for m = 1, 2, ... while they occur, up to
        max_depth - 1 (a longer match leaves no room to draft)."""
        pattern = list(pattern)
        out: list[Position] = []
        for m in range(1, min(len(pattern), self.max_depth - 1) + 1):
            pos = self.find(pattern[-m:])
            if pos is None:
                break
            out.append(pos)
        return out

    def speculate(self, pattern: Sequence[int], max_draft_tokens: int, **knobs) -> "SuffixDraft":
        """The best draft to follow `pattern` from this tree alone (see `speculate`)."""
        return speculate([(self, self.match(pattern), 0)], max_draft_tokens, **knobs)

    def longest_match(self, pattern: Sequence[int]) -> int:
        """Length of the longest suffix of pattern that occurs in the tree (at most max_depth)."""
        pattern, m = list(pattern), 0
        while m < min(len(pattern), self.max_depth) and self.find(pattern[len(pattern) - m - 1:]):
            m += 1
        return m

    def tail_positions(self, seq_id: int) -> list[Position]:
        """Positions of a sequence's own last m tokens, longest first, for the m whose path occurs
        elsewhere too (the others occur only at the tail: nothing follows them)."""
        n = len(self._seqs[seq_id])
        return [(node, n - s) for s, node in self._active[seq_id]]

    def paths(self) -> dict[tuple[int, ...], int]:
        """Every path in the tree with its count (for tests: O(total path length))."""
        out: dict[tuple[int, ...], int] = {}
        stack = [(self.root, ())]
        while stack:
            node, prefix = stack.pop()
            for child in node.children.values():
                path = prefix
                for i in range(node.depth, child.end(self.max_depth)):
                    path = path + (child.seq[child.start + i],)
                    out[path] = child.count
                stack.append((child, path))
        return out

    def check(self) -> None:
        """Assert the structural invariants (for tests)."""
        md, stack = self.max_depth, [self.root]
        while stack:
            node = stack.pop()
            assert node.count > 0 or node is self.root
            assert node.forward is None
            ends = node.count - sum(c.count for c in node.children.values())
            assert ends >= 0
            if node is not self.root:
                start = node.parent.depth
                end = node.end(md)
                assert start < end <= md
                assert node.parent.children[node.seq[node.start + start]] is node
                assert node.seq is self._seqs[node.sid]
                assert node.start + end <= len(node.seq)
                if node.depth < 0:
                    assert node.count == 1 and not node.children
                else:  # a boundary is where the count changes
                    assert ends > 0 or len(node.children) > 1
                    if self.removable:
                        assert bool(ends) == bool(node.ends), node
                        for sid, s in (node.ends or {}).items():
                            assert self._seqs[sid][s:s + end] == node.seq[node.start:node.start + end]
            for child in node.children.values():
                assert child.parent is node
                stack.append(child)
        for sid, active in self._active.items():
            n = len(self._seqs[sid])
            assert [s for s, _ in active] == sorted(s for s, _ in active)
            for s, node in active:
                assert node.count > 0 and node.depth == n - s < md


def _fuse_into_child(node: _Node, child: _Node, seq: list[int], s: int) -> _Node:
    """The suffix seq[s:], node's only endpoint, moves on to the end of child, node's only
    child: node marks nothing any more and is fused into child, which is returned."""
    parent = node.parent
    parent.children[seq[s + parent.depth]] = child
    child.parent = parent
    child.count += 1
    node.count, node.forward = 0, child
    return child


def _split(node: _Node, child: _Node, t: int, seq: list[int], seq_id: int, s: int, depth: int) -> _Node:
    """The suffix seq[s:] (ending at node) moves on inside child's edge, to `depth`: a new node
    ends there, between node and child, and is returned."""
    target = _Node(child.count + 1, node, seq, seq_id, s, depth)
    target.children[child.seq[child.start + depth]] = child
    child.parent = target
    node.children[t] = target
    return target


def _kill(node: _Node) -> None:
    # A node whose count reached 0 had count 1: it and its subtree are one chain of count-1 nodes.
    while True:
        node.count = 0
        if not node.children:
            return
        node = next(iter(node.children.values()))

