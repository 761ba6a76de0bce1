"""KV page allocation with reference counts."""

from __future__ import annotations

import collections


class PagePool:
    """Hands out page ids; a page returns to the free list when its last reference goes.

    Holders: each request using a page, and the prefix cache for pages it indexes.
    """

    def __init__(self, num_pages: int):
        if num_pages <= 0:
            raise ValueError(f"num_pages={num_pages} must be > 0")
        self.num_pages = num_pages
        self._free = collections.deque(range(num_pages))
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def allocate(self, n: int) -> list[int]:
        """n fresh pages with refcount 1; raises MemoryError if fewer are free (check num_free)."""
        if n > len(self._free):
            raise MemoryError(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def incref(self, pages) -> None:
        for p in pages:
            assert self._refs[p] > 0, f"incref of free page {p}"
            self._refs[p] += 1

    def decref(self, pages) -> list[int]:
        """Drops one reference from each page; returns the pages that became free."""
        freed = []
        for p in pages:
            assert self._refs[p] > 0, f"double free of page {p}"
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)
                freed.append(p)
        return freed
