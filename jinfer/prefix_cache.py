"""Prefix cache: a radix tree over token ids at page granularity, with runs of pages on an edge.

An edge holds one or more full pages of token ids (a multiple of page_size tokens); the node
it leads to owns the KV pages holding them. A node is split where a match, an insert or a lock
ends inside it, so every lock point is a node's end, and the pages of one node always share
their last access (they were touched together). The tree holds one pool reference per page;
requests using a node hold `lock_ref` on it and its ancestors, and their own page references.
Unlocked leaves are evicted in the order a small strategy object gives (LRU here;
priority-aware strategies plug in the same way), a leaf's pages last first, so eviction frees
exactly what a tree of one page per node would, in the same order; a prompt of n pages costs
one node, not n.
"""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Protocol

from jinfer.page_pool import PagePool


class Node:
    __slots__ = ("key", "pages", "parent", "children", "lock_ref", "last_access")

    def __init__(self, key: tuple[int, ...], pages: list[int], parent: "Node | None", last_access: float):
        self.key = key  # the token ids of the edge into this node: len(pages) full pages
        self.pages = pages
        self.parent = parent
        self.children: dict[tuple[int, ...], Node] = {}  # by the first page of their key
        self.lock_ref = 0  # requests currently using this node (or a descendant)
        self.last_access = last_access


class EvictionStrategy(Protocol):
    def sort_key(self, node: Node):
        """Nodes with the smallest key are evicted first."""


class LRU:
    def sort_key(self, node: Node):
        return node.last_access


def _as_tuple(tokens) -> tuple[int, ...]:
    return tokens if isinstance(tokens, tuple) else tuple(tokens)


class PrefixCache:
    def __init__(self, pool: PagePool, page_size: int, strategy: EvictionStrategy | None = None):
        self.pool = pool
        self.page_size = page_size
        self.strategy = strategy or LRU()
        self.root = Node((), [], None, 0.0)
        self.num_pages = 0
        """Pages the cache indexes (each holds one pool reference)."""
        # Unlocked nodes without children: what evict() chooses from, kept up to date so that
        # an eviction looks at the leaves, not the whole tree.
        self._leaves: dict[Node, None] = {}  # insertion-ordered: ties evict deterministically
        self.on_evict = None
        """Optional callback(node, num_pages) before the last num_pages pages of `node` are
        evicted (`tokens_to(node)` still gives all its tokens; a node losing all its pages is
        then unlinked, its parent link kept). Routers keeping a global view listen here,
        usually through an EvictionLog."""

    # -- walking -----------------------------------------------------------------------------

    def _walk(self, tokens, touch: float | None):
        """Follows `tokens` (a tuple) by whole pages from the root. Returns (node, offset,
        pages): the deepest node reached, how many of its key's tokens matched (its whole key
        unless the match ends inside it), and the matched pages. touch: set last_access of
        every wholly matched node (a partly matched one is for the caller to split first)."""
        ps, node, pos, pages = self.page_size, self.root, 0, []
        end = len(tokens) // ps * ps
        while pos < end:
            child = node.children.get(tokens[pos:pos + ps])
            if child is None:
                break
            key, n = child.key, len(child.key)
            if pos + n <= end and tokens[pos:pos + n] == key:
                m = n
            else:
                m = ps
                while m < n and pos + m < end and tokens[pos + m:pos + m + ps] == key[m:m + ps]:
                    m += ps
            pages.extend(child.pages[:m // ps] if m < n else child.pages)
            if m < n:
                return child, m, pages
            if touch is not None:
                child.last_access = touch
            node, pos = child, pos + n
        return node, len(node.key), pages

    def _split(self, node: Node, at: int) -> Node:
        """Cuts node's edge after `at` tokens (a whole number of pages, inside the key): returns
        the new upper node, whose child `node` keeps the rest. Locks and access times carry."""
        upper = Node(node.key[:at], node.pages[:at // self.page_size], node.parent, node.last_access)
        upper.lock_ref = node.lock_ref
        node.parent.children[node.key[:self.page_size]] = upper
        node.key, node.pages, node.parent = node.key[at:], node.pages[at // self.page_size:], upper
        upper.children[node.key[:self.page_size]] = node
        return upper

    def _up(self, node: Node, num_pages: int) -> Node:
        """The node ending num_pages pages above node's end (splitting there if needed)."""
        while num_pages > 0:
            n = len(node.pages)
            if num_pages < n:
                return self._split(node, (n - num_pages) * self.page_size)
            num_pages -= n
            node = node.parent
        return node

    # -- lookups -----------------------------------------------------------------------------

    def match(self, tokens, max_pages: int | None = None) -> tuple[list[int], Node]:
        """Pages of the longest cached full-page prefix of `tokens` (touched: their access time
        is now), at most max_pages of them, and the node they end at (to lock)."""
        now = time.monotonic()
        node, offset, pages = self._walk(_as_tuple(tokens), now)
        if offset < len(node.key):
            node = self._split(node, offset)
            node.last_access = now
        if max_pages is not None and len(pages) > max_pages:
            node = self._up(node, len(pages) - max_pages)
            del pages[max_pages:]
        return pages, node

    def peek(self, tokens) -> int:
        """Tokens of the longest cached full-page prefix, without touching access times."""
        return len(self._walk(_as_tuple(tokens), None)[2]) * self.page_size

    def lock(self, node: Node) -> None:
        while node is not self.root:
            node.lock_ref += 1
            self._leaves.pop(node, None)
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not self.root:
            assert node.lock_ref > 0, "unlock below zero"
            node.lock_ref -= 1
            if node.lock_ref == 0 and not node.children:
                self._leaves[node] = None
            node = node.parent

    def insert(self, tokens, pages: list[int]) -> Node:
        """Indexes the full pages of `tokens` (pages[i] holds page i); returns the node they end
        at. Where a page's tokens are already indexed the cache keeps its own page (the
        caller's stays the caller's); new pages take a pool reference."""
        ps, now = self.page_size, time.monotonic()
        toks = _as_tuple(tokens)
        n = min(len(toks) // ps, len(pages)) * ps
        toks = toks[:n]
        node, offset, matched = self._walk(toks, now)
        if offset < len(node.key):
            node = self._split(node, offset)
            node.last_access = now
        done = len(matched) * ps
        if done < n:
            rest = pages[done // ps:n // ps]
            child = Node(toks[done:], list(rest), node, now)
            node.children[toks[done:done + ps]] = child
            self._leaves.pop(node, None)
            self._leaves[child] = None
            self.pool.incref(rest)
            self.num_pages += len(rest)
            node = child
        return node

    def tokens_to(self, node: Node) -> tuple[int, ...]:
        """The token ids from the root to the end of `node`."""
        keys = []
        while node is not None and node is not self.root:
            keys.append(node.key)
            node = node.parent
        return tuple(itertools.chain.from_iterable(reversed(keys)))

    def nodes(self):
        """Every node but the root (any order)."""
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    # -- eviction ----------------------------------------------------------------------------

    def evict(self, num_pages: int) -> int:
        """Frees up to num_pages pages from unlocked leaves, a leaf's last pages first; returns
        how many were freed (a page a request still holds leaves the cache but not the pool)."""
        tie = itertools.count()
        heap = [(self.strategy.sort_key(n), next(tie), n) for n in self._leaves]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_pages:
            node = heapq.heappop(heap)[2]
            take = 0
            for page in reversed(node.pages):
                take += 1
                freed += self.pool.refcount(page) == 1
                if freed >= num_pages:
                    break
            if self.on_evict is not None:
                self.on_evict(node, take)
            gone = node.pages[len(node.pages) - take:]
            self.pool.decref(gone[::-1])  # (the pool frees them in eviction order: last first)
            self.num_pages -= take
            if take < len(node.pages):  # the request is met inside this node: it stays a leaf
                del node.pages[len(node.pages) - take:]
                node.key = node.key[:len(node.pages) * self.page_size]
                continue
            self._leaves.pop(node, None)
            parent = node.parent
            del parent.children[node.key[:self.page_size]]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                self._leaves[parent] = None
                heapq.heappush(heap, (self.strategy.sort_key(parent), next(tie), parent))
        return freed

    def clear(self) -> int:
        """Drops every unlocked node (e.g. after new weights make cached KV stale); returns
        the pages freed."""
        return self.evict(self.num_pages)

    def check(self) -> None:
        """Asserts the tree's invariants (for tests): keys are whole pages, one per page held;
        children filed under their first page; lock counts cover their descendants'; the leaf
        set evict() chooses from is exactly the unlocked childless nodes."""
        ps, pages = self.page_size, 0
        for n in self.nodes():
            assert n.pages and len(n.key) == len(n.pages) * ps, "a key is not its pages"
            assert n.parent.children[n.key[:ps]] is n, "a child filed under another key"
            assert n.lock_ref >= sum(c.lock_ref for c in n.children.values()), "a lock not on an ancestor"
            pages += len(n.pages)
        assert pages == self.num_pages, "num_pages disagrees with the tree"
        leaves = {n for n in self.nodes() if not n.children and n.lock_ref == 0}
        assert set(self._leaves) == leaves, "the leaf set is stale"


class EvictionLog:
    """Evictions since the last drain() as (tokens, keep) entries: the cache no longer holds
    tokens[keep:]. A node evicted right after its child (the cache evicts leaf first, so a
    whole path goes node by node), or a node evicted again from its end, extends the last
    entry instead of adding one, so a long prompt's eviction costs one token path. Use as the
    hook: `cache.on_evict = log.record`."""

    def __init__(self, cache: PrefixCache):
        self.cache = cache
        self._entries: list[list] = []
        self._next = None  # the node whose end an eviction would continue the last entry at

    def record(self, node: Node, num_pages: int) -> None:
        cut = num_pages * self.cache.page_size
        if self._entries and node is self._next:
            self._entries[-1][1] -= cut
        else:
            tokens = self.cache.tokens_to(node)
            self._entries.append([tokens, len(tokens) - cut])
        self._next = node if num_pages < len(node.pages) else node.parent

    def __bool__(self) -> bool:
        return bool(self._entries)

    def drain(self) -> list[tuple[tuple[int, ...], int]]:
        out = [(tokens, keep) for tokens, keep in self._entries]
        self._entries.clear()
        self._next = None
        return out
