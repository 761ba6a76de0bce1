"""Prefix cache: a radix tree over token ids at page granularity.

Each edge is one full page of token ids; the node it leads to owns the KV page holding them.
The tree holds one pool reference per node; requests using a node hold `lock_ref` on it and
its ancestors, and their own page references. Unlocked leaves are evicted in the order a small
strategy object gives (LRU here; priority-aware strategies plug in the same way).
"""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Protocol

from jinfer.page_pool import PagePool


class Node:
    __slots__ = ("key", "page", "parent", "children", "lock_ref", "last_access")

    def __init__(self, key: tuple[int, ...], page: int, parent: "Node | None"):
        self.key = key  # the page's token ids
        self.page = page
        self.parent = parent
        self.children: dict[tuple[int, ...], Node] = {}
        self.lock_ref = 0  # requests currently using this node (or a descendant)
        self.last_access = time.monotonic()


class EvictionStrategy(Protocol):
    def sort_key(self, node: Node):
        """Nodes with the smallest key are evicted first."""


class LRU:
    def sort_key(self, node: Node):
        return node.last_access


class PrefixCache:
    def __init__(self, pool: PagePool, page_size: int, strategy: EvictionStrategy | None = None):
        self.pool = pool
        self.page_size = page_size
        self.strategy = strategy or LRU()
        self.root = Node((), -1, None)
        self.num_nodes = 0
        # Unlocked nodes without children: what evict() chooses from, kept up to date so that
        # an eviction looks at the leaves, not the whole tree.
        self._leaves: dict[Node, None] = {}  # insertion-ordered: ties evict deterministically
        self.on_evict = None
        """Optional callback(node) for each evicted node, leaf first (its parent link is kept;
        `tokens_to(node)` gives its tokens). Routers keeping a global view listen here, usually
        through an EvictionLog."""

    def _pages_of(self, tokens) -> list[tuple[int, ...]]:
        ps = self.page_size
        return [tuple(tokens[i:i + ps]) for i in range(0, len(tokens) - ps + 1, ps)]

    def match(self, tokens) -> tuple[list[int], Node]:
        """Pages of the longest cached full-page prefix of `tokens`, and its deepest node."""
        node, pages, now = self.root, [], time.monotonic()
        for key in self._pages_of(tokens):
            child = node.children.get(key)
            if child is None:
                break
            child.last_access = now
            pages.append(child.page)
            node = child
        return pages, node

    def peek(self, tokens) -> int:
        """Tokens of the longest cached full-page prefix, without touching access times."""
        node, n = self.root, 0
        for key in self._pages_of(tokens):
            node = node.children.get(key)
            if node is None:
                break
            n += self.page_size
        return n

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
        """Indexes the full pages of `tokens` (pages[i] holds page i); returns the deepest node.

        Where a page's tokens are already indexed the existing node is kept (the caller's page
        stays the caller's); new nodes take a pool reference on the caller's page.
        """
        node, now = self.root, time.monotonic()
        for key, page in zip(self._pages_of(tokens), pages):
            child = node.children.get(key)
            if child is None:
                child = Node(key, page, node)
                node.children[key] = child
                self._leaves.pop(node, None)
                self._leaves[child] = None
                self.pool.incref([page])
                self.num_nodes += 1
            child.last_access = now
            node = child
        return node

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def evict(self, num_pages: int) -> int:
        """Frees up to num_pages pages from unlocked leaves; returns how many were freed."""
        tie = itertools.count()
        heap = [(self.strategy.sort_key(n), next(tie), n) for n in self._leaves]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_pages:
            _, _, node = heapq.heappop(heap)
            self._leaves.pop(node, None)
            parent = node.parent
            del parent.children[node.key]
            self.num_nodes -= 1
            if self.on_evict is not None:
                self.on_evict(node)
            freed += len(self.pool.decref([node.page]))
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                self._leaves[parent] = None
                heapq.heappush(heap, (self.strategy.sort_key(parent), next(tie), parent))
        return freed

    def tokens_to(self, node: Node) -> tuple[int, ...]:
        """The token ids from the root to the end of `node`."""
        keys = []
        while node is not None and node is not self.root:
            keys.append(node.key)
            node = node.parent
        return tuple(t for key in reversed(keys) for t in key)

    def clear(self) -> int:
        """Drops every unlocked node (e.g. after new weights make cached KV stale); returns
        the pages freed."""
        return self.evict(self.num_nodes)


class EvictionLog:
    """Evictions since the last drain() as (tokens, keep) entries: the cache no longer holds
    tokens[keep:]. A node evicted right after its child (the cache evicts leaf first, so a
    whole path goes page by page) extends the child's entry instead of adding one, so a
    long prompt's eviction costs one token path, not one per page. Use as the hook:
    `cache.on_evict = log.record`."""

    def __init__(self, cache: PrefixCache):
        self.cache = cache
        self._entries: list[list] = []
        self._parent = None  # parent of the node recorded last

    def record(self, node: Node) -> None:
        if self._entries and node is self._parent:
            self._entries[-1][1] -= len(node.key)
        else:
            tokens = self.cache.tokens_to(node)
            self._entries.append([tokens, len(tokens) - len(node.key)])
        self._parent = node.parent

    def __bool__(self) -> bool:
        return bool(self._entries)

    def drain(self) -> list[tuple[tuple[int, ...], int]]:
        out = [(tokens, keep) for tokens, keep in self._entries]
        self._entries.clear()
        self._parent = None
        return out
