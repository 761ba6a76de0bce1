"""The router's global radix tree (Preble): which replicas cache which prompt prefixes, and how
often each prefix was used on each replica within a sliding window.

A compressed radix tree over token ids (edges hold token runs; children keyed by their first
token). Every node records
  - `cached_on`: replicas holding the node's tokens in their KV cache. A replica that caches a
    node caches all its ancestors too (`cached_on` of a child is a subset of its parent's);
  - `hits`: per replica, the times requests routed there used the node, kept for `window_s`.
Replicas report evictions (`evict`), so the tree stays close to what they really hold; a replica
that goes down is forgotten everywhere (`drop_replica`). `prune` drops nodes no replica caches
and no request used within the window.
"""

from __future__ import annotations

import collections


class TreeNode:
    __slots__ = ("key", "children", "parent", "cached_on", "hits", "depth", "last_used")

    def __init__(self, key: tuple[int, ...], parent: "TreeNode | None"):
        self.key = key
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.cached_on: set[int] = set()
        self.hits: dict[int, collections.deque] = {}
        self.depth = (parent.depth if parent is not None else 0) + len(key)  # tokens root..end of node
        self.last_used = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.key)

    def window_hits(self, replica: int, now: float, window_s: float) -> int:
        q = self.hits.get(replica)
        if not q:
            return 0
        while q and q[0] < now - window_s:
            q.popleft()
        return len(q)

    def total_window_hits(self, now: float, window_s: float) -> int:
        return sum(self.window_hits(r, now, window_s) for r in list(self.hits))

    def __repr__(self):
        return f"TreeNode(depth={self.depth}, tokens={self.num_tokens}, cached_on={sorted(self.cached_on)})"


class GlobalRadixTree:
    def __init__(self, window_s: float = 180.0):
        if window_s <= 0:
            raise ValueError(f"window_s={window_s} must be > 0")
        self.window_s = window_s
        self.root = TreeNode((), None)
        self.tokens_on: collections.Counter = collections.Counter()  # replica -> tokens it caches

    # -- lookup ----------------------------------------------------------------------------

    def match(self, tokens) -> tuple[list[TreeNode], int]:
        """The nodes a prompt passes through (the last possibly only partly) and how many of
        its tokens the tree holds."""
        tokens = tuple(tokens)
        node, i, path = self.root, 0, []
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            n = _common(child.key, tokens, i)
            path.append(child)
            i += n
            if n < len(child.key):
                break
            node = child
        return path, i

    def cached_lengths(self, tokens, replicas) -> dict[int, int]:
        """Per replica: how many leading tokens of the prompt it caches (whole nodes only,
        except that a partly matched last node counts its matched part)."""
        return self.lengths_on_path(*self.match(tokens), replicas)

    @staticmethod
    def lengths_on_path(path: list[TreeNode], matched: int, replicas) -> dict[int, int]:
        """cached_lengths from a match() already made."""
        out = {r: 0 for r in replicas}
        for node in path:
            end = min(node.depth, matched)
            for r in node.cached_on:
                if r in out:
                    out[r] = end
        return out

    # -- updates ---------------------------------------------------------------------------

    def _split(self, node: TreeNode, at: int) -> TreeNode:
        """Splits node's edge after `at` tokens; returns the new upper node."""
        parent = node.parent
        upper = TreeNode(node.key[:at], parent)
        upper.cached_on = set(node.cached_on)
        upper.hits = {r: collections.deque(q) for r, q in node.hits.items()}
        upper.last_used = node.last_used
        parent.children[upper.key[0]] = upper
        node.key = node.key[at:]
        node.parent = upper
        upper.children[node.key[0]] = node
        return upper

    def insert(self, tokens, replica: int | None, now: float, record_hit: bool = True) -> list[TreeNode]:
        """Adds the prompt; marks every node on its path cached on `replica` (None: nowhere)
        and, if record_hit, a request use at `now`. Returns the path."""
        tokens = tuple(tokens)
        node, i, path = self.root, 0, []
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                child = TreeNode(tokens[i:], node)
                node.children[tokens[i]] = child
                i = len(tokens)
            else:
                n = _common(child.key, tokens, i)
                if n < len(child.key):
                    child = self._split(child, n)
                i += n
            path.append(child)
            node = child
        for n in path:
            n.last_used = now
            if replica is not None:
                if replica not in n.cached_on:
                    self.tokens_on[replica] += n.num_tokens
                n.cached_on.add(replica)
                if record_hit:
                    n.hits.setdefault(replica, collections.deque()).append(now)
        return path

    def evict(self, tokens, keep: int, replica: int) -> int:
        """`replica` no longer caches tokens[keep:] of this sequence (nor anything below);
        returns how many cached tokens that took from it."""
        path, matched = self.match(tokens)
        if matched <= keep:
            return 0  # the tree does not hold tokens[keep] on this path: nothing to drop
        for node in path:
            if node.depth <= keep:
                continue
            start = node.depth - node.num_tokens
            if start < keep:  # straddles the boundary: split; `node` becomes the lower part
                self._split(node, keep - start)
            return self._drop_replica(node, replica)
        return 0

    def _drop_replica(self, node: TreeNode, replica: int) -> int:
        stack, dropped = [node], 0
        while stack:
            n = stack.pop()
            if replica in n.cached_on:
                n.cached_on.discard(replica)
                dropped += n.num_tokens
                stack.extend(n.children.values())  # below a node it lacks, it lacks everything
        self.tokens_on[replica] -= dropped
        return dropped

    def drop_replica(self, replica: int) -> int:
        """Forgets `replica` everywhere: what it caches and its window hits (it went down; it
        comes back cold). Returns how many cached tokens that took from it."""
        dropped = 0
        for n in self.nodes():
            if replica in n.cached_on:
                n.cached_on.discard(replica)
                dropped += n.num_tokens
            n.hits.pop(replica, None)
        assert dropped == self.tokens_on[replica], f"tokens_on[{replica}]={self.tokens_on[replica]} drifted"
        self.tokens_on.pop(replica, None)
        return dropped

    def prune(self, now: float) -> int:
        """Drops nodes no replica caches and no request used within the window (with their
        subtrees, which then hold nothing either). Returns how many nodes were removed."""
        removed = 0
        stack = [self.root]
        order = []
        while stack:
            n = stack.pop()
            order.append(n)
            stack.extend(n.children.values())
        for n in reversed(order):  # children before parents
            if n is self.root:
                continue
            if not n.children and not n.cached_on and n.total_window_hits(now, self.window_s) == 0:
                del n.parent.children[n.key[0]]
                removed += 1
        return removed

    def nodes(self):
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def cached_tokens(self, replica: int) -> int:
        """Tokens the tree believes `replica` caches (shared prefixes counted once), counted
        by walking the tree (tokens_on keeps the same number incrementally)."""
        return sum(n.num_tokens for n in self.nodes() if replica in n.cached_on)

    def check(self) -> None:
        """Asserts the structural invariants (tests)."""
        for n in self.nodes():
            assert n.key, "empty edge"
            assert n.parent.children.get(n.key[0]) is n, "child keyed by a token other than its first"
            assert n.depth == n.parent.depth + len(n.key), "depth out of date"
            assert n.cached_on <= (n.parent.cached_on if n.parent is not self.root else n.cached_on), \
                "a replica caches a node but not its parent"
        for r, tokens in self.tokens_on.items():
            assert tokens == self.cached_tokens(r), f"tokens_on[{r}]={tokens} drifted"


def _common(key: tuple[int, ...], tokens: tuple[int, ...], start: int) -> int:
    """Length of the common prefix of key and tokens[start:] (slice compares run in C)."""
    n = min(len(key), len(tokens) - start)
    if key[:n] == tokens[start:start + n]:
        return n
    lo, hi = 0, n  # key[:lo] matches; key[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if key[lo:mid] == tokens[start + lo:start + mid]:
            lo = mid
        else:
            hi = mid
    return lo
