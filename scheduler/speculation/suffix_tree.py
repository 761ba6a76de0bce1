"""Counted, depth-capped suffix trees over token sequences (SuffixDecoding, Oliaro et al., NeurIPS'25).

What it holds. For every sequence and every start position s, the suffix seq[s:] cut to
`max_depth` tokens is a path from the root. A node's count is how many of those paths pass
through it: how many times its token path occurs (length <= max_depth) in the sequences. A pattern
P followed by X then has path probability count(P + X) / count(P), the product of child/parent
count ratios along the path, which is what drafting (`speculate`, at the end) ranks by.

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
forward (`TailMatcher` does this).
"""

from __future__ import annotations

import bisect
import functools
import heapq
import math
import operator
from typing import Iterable, NamedTuple, Sequence

_START = operator.itemgetter(0)
_TIE = 1e-9


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
        active = self._active[seq_id]
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
                    if track and node is not root:
                        del node.ends[seq_id]
                    if node.count == 1 and node is not root:
                        # Alone at a leaf: the leaf becomes open and grows with this sequence.
                        node.depth, node.seq, node.sid, node.start = -1, seq, seq_id, s
                    else:
                        node.children[t] = _Node(1, node, seq, seq_id, s, -1)
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
                    if cend > d1:  # the common case in repeated text
                        children = node.children
                        del children[t]
                        children[child.seq[child.start + d1]] = child
                        node.depth = d1
                        if node.start != s or node.seq is not seq:
                            node.seq, node.sid, node.start = seq, seq_id, s
                        if d1 < md:
                            kept.append(item)
                        continue
                    parent = node.parent
                    parent.children[seq[s + parent.depth]] = child
                    child.parent = parent
                    child.count += 1
                    node.count, node.forward = 0, child
                    target = child
                elif cend == d1:
                    child.count += 1
                    target = child
                else:
                    target = _Node(child.count + 1, node, seq, seq_id, s, d1)
                    target.children[child.seq[child.start + d1]] = child
                    child.parent = target
                    node.children[t] = target
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
        self._active[seq_id] = active
        self.version += 1

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


def _kill(node: _Node) -> None:
    # A node whose count reached 0 had count 1: it and its subtree are one chain of count-1 nodes.
    while True:
        node.count = 0
        if not node.children:
            return
        node = next(iter(node.children.values()))


class TailMatcher:
    """Where the tail of a growing token sequence (a request's context) matches in a tree that
    others change: the positions of its last m tokens for m = 1..L, kept up to date in O(L) per
    token and repaired (not recomputed) after the tree changes."""

    def __init__(self, tree: SuffixTree, context: Sequence[int]):
        self.tree = tree
        self.context = context
        """The sequence whose tail is matched (the caller appends to it, then calls advance)."""
        self.length = len(context)  # tokens of context the positions account for
        self.nodes: list[_Node] = []  # nodes[m - 1]: the node holding the end of the last m tokens
        self._version = -1
        self._sync()

    def positions(self) -> list[Position]:
        """Positions for m = 1..L (shortest first)."""
        self._sync()
        return list(zip(self.nodes, range(1, len(self.nodes) + 1)))

    def advance(self, token: int) -> None:
        """The context grew by `token` (already appended to it)."""
        self._sync()
        self.length += 1
        md = self.tree.max_depth
        first = self.tree.root.children.get(token)
        if first is None or md < 2:
            self.nodes = []
            return
        new = [first]
        # Last m tokens + token absent => last m + 1 tokens + token absent: stop at the first miss.
        for i, node in enumerate(self.nodes[:md - 2]):
            m = i + 1
            end = node.depth
            if end < 0:
                end = min(len(node.seq) - node.start, md)
            if m < end:
                if node.seq[node.start + m] != token:
                    break
                new.append(node)
            else:
                child = node.children.get(token)
                if child is None:
                    break
                new.append(child)
        self.nodes = new

    def _sync(self) -> None:
        tree = self.tree
        if self._version == tree.version:
            return
        self._version = tree.version
        nodes = self.nodes
        for i, node in enumerate(nodes):
            while node.count == 0:  # fused into its child, or deleted (the match is gone)
                node = node.forward
                if node is None:
                    del nodes[i:]
                    break
            else:
                while i + 1 <= node.parent.depth:  # split: the position is now in an ancestor
                    node = node.parent
                nodes[i] = node
                continue
            break
        # New sequences may make longer tails match.
        ctx, n = self.context, self.length
        while len(nodes) < min(n, tree.max_depth - 1):
            m = len(nodes) + 1
            pos = tree.find(ctx[n - m:n])
            if pos is None:
                break
            nodes.append(pos[0])


# -- drafting -------------------------------------------------------------------------------


class SuffixDraft(NamedTuple):
    """A draft grown from one match: tokens in topological order, their parents (-1: the last
    context token), each token's path probability, and the length of the match it continues."""

    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()
    probs: tuple[float, ...] = ()
    score: float = 0.0
    """Sum of probs: the expected number of accepted tokens if counts were probabilities."""
    match_len: int = 0


NO_SUFFIX_DRAFT = SuffixDraft()


def spec_budget(match_len: int, max_draft_tokens: int, max_spec_factor: float, max_spec_offset: float) -> int:
    """Tokens a match of match_len tokens may draft: min(max_draft_tokens, floor(factor * m + offset))."""
    # The epsilon keeps 0.29 * 100 at 29, as the reference implementation's does.
    return max(0, min(max_draft_tokens, math.floor(max_spec_factor * match_len + max_spec_offset + 1e-6)))


def speculate(sources: Sequence[tuple[SuffixTree, Sequence[Position], int]], max_draft_tokens: int, *,
              max_spec_factor: float = 1.0, max_spec_offset: float = 0.0,
              min_token_prob: float = 0.1, tree: bool = False) -> SuffixDraft:
    """The best-scoring draft over the matches of a pattern in one or more trees.

    sources: (tree, positions, known_ends) per tree, the preferred tree first; positions (node, m)
    of the pattern's last m tokens (`SuffixTree.match`, `tail_positions`, `TailMatcher`);
    known_ends: occurrences of each matched path known to end right there (1 for a request's own
    tail in its own tree, else 0); it only tightens the bound that skips hopeless matches.

    Every match is a candidate that may draft spec_budget(m) tokens (and max_depth - m at most,
    all the tree holds below it): the chain of most frequent children (ties: the smallest
    token), or (tree=True) the subtree grown best-first by path probability; tokens below
    min_token_prob are never drafted. Its score is the sum of its path probabilities; the best
    wins, ties going to the earlier source, then the longer match. Matches are tried in order of
    an upper bound on their score (budget x the first token's best probability) and the search
    stops when no bound can win, so a call usually grows one or two drafts.
    """
    cands = []
    for rank, (st, positions, known) in enumerate(sources):
        md = st.max_depth
        budgets = _budgets(max_draft_tokens, max_spec_factor, max_spec_offset, md)
        if not known:  # the bound is the budget: every continuation may be certain
            cands += [(budgets[m], -rank, m, budgets[m], node, md) for node, m in positions if budgets[m] > 0]
            continue
        for node, m in positions:
            n, count = budgets[m], node.count
            if n > 0 and count > known:
                cands.append((n * (count - known) / count, -rank, m, n, node, md))
    if not cands:
        return NO_SUFFIX_DRAFT
    grow = _grow_tree if tree else _grow_chain
    # Candidates order by (bound, rank, m), unique per candidate, so tuples compare without
    # reaching the nodes. The top one usually scores its bound (its continuation is certain):
    # then nothing can beat it and the others are never sorted.
    top = max(cands)
    first = grow(top[4], top[2], top[3], min_token_prob, top[5])
    first_score = sum(first[2])
    if first[0] and first_score >= top[0] - _TIE * max(1.0, top[0]):
        return SuffixDraft(tuple(first[0]), tuple(first[1]), tuple(first[2]), first_score, top[2])
    cands.sort(reverse=True)
    best, best_score, best_rank = NO_SUFFIX_DRAFT, 0.0, None
    for cand in cands:
        bound, rank, m, n, node, md = cand
        if best_rank is not None:
            # Scores within _TIE of each other tie (sums of the same ratios in another order).
            # Once a bound cannot beat the best, or can only tie it from a worse (rank, m),
            # nothing after it can (and distinct bounds are never that close).
            tol = _TIE * max(1.0, best_score)
            if bound < best_score - tol or (bound <= best_score + tol and (rank, m) < best_rank):
                break
        if cand is top:
            (tokens, parents, probs), score = first, first_score
        else:
            tokens, parents, probs = grow(node, m, n, min_token_prob, md)
            score = sum(probs)
        if not tokens:
            continue
        tol = _TIE * max(1.0, best_score)
        if best_rank is None or score > best_score + tol or (
                score >= best_score - tol and (rank, m) > best_rank):
            best_score, best_rank = score, (rank, m)
            best = SuffixDraft(tuple(tokens), tuple(parents), tuple(probs), score, m)
    return best


@functools.lru_cache(maxsize=256)
def _budgets(max_draft_tokens: int, factor: float, offset: float, max_depth: int) -> tuple[int, ...]:
    """Per match length m (index), the tokens it may draft: spec_budget and the room below it."""
    return tuple(min(spec_budget(m, max_draft_tokens, factor, offset), max_depth - m)
                 for m in range(max_depth + 1))


def _grow_chain(node: _Node, m: int, n: int, min_prob: float, md: int):
    """Up to n tokens following position (node, m) along the most frequent child (ties: the
    smallest token)."""
    base = node.count
    tokens: list[int] = []
    probs: list[float] = []
    while True:
        end = node.depth
        if end < 0:
            end = min(len(node.seq) - node.start, md)
        if m < end:  # the rest of this edge: one count, so one probability
            k = min(end - m, n - len(tokens))
            tokens.extend(node.seq[node.start + m:node.start + m + k])
            probs.extend([node.count / base] * k)
            m += k
            if len(tokens) >= n:
                break
        best, best_count, best_token = None, 0, 0
        for token, child in node.children.items():
            if child.count > best_count or (child.count == best_count and token < best_token):
                best, best_count, best_token = child, child.count, token
        if best is None or best_count / base < min_prob:
            break
        node = best
    return tokens, list(range(-1, len(tokens) - 1)), probs


def _grow_tree(node: _Node, m: int, n: int, min_prob: float, md: int):
    """Up to n tokens below position (node, m), most probable paths first (parents first)."""
    base = node.count
    tokens: list[int] = []
    parents: list[int] = []
    probs: list[float] = []
    heap = [(-1.0, 0, node, m, -1)]  # (-path probability, tie-break, node, position, parent index)
    pushed = 1
    while heap and len(tokens) < n:
        neg_p, _, node, m, parent = heapq.heappop(heap)
        end = node.end(md)
        if m < end:
            k = min(end - m, n - len(tokens))
            for token in node.seq[node.start + m:node.start + m + k]:
                tokens.append(token)
                parents.append(parent)
                probs.append(-neg_p)
                parent = len(tokens) - 1
            m += k
            if m < end:
                break
        for child in node.children.values():
            p = child.count / base
            if p >= min_prob:
                heapq.heappush(heap, (-p, pushed, child, m, parent))
                pushed += 1
    return tokens, parents, probs
