"""The KV manager: which pages each request holds. Allocation from the pool (evicting unlocked
prefix-cache pages when short), prefix matching on admission, forking a prompt's samples onto
its pages, indexing computed pages in the prefix cache, release. The scheduler decides who
runs; this module only keeps the pages right (refcounts, cache locks)."""

from __future__ import annotations

from jinfer.page_pool import PagePool
from jinfer.prefix_cache import EvictionLog, PrefixCache
from jinfer.request import Request


class KVManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_cache: bool):
        self.page_size = page_size
        self.pool = PagePool(num_pages)
        self.prefix_cache = PrefixCache(self.pool, page_size) if enable_prefix_cache else None

    @property
    def num_free(self) -> int:
        """Pages in no request and no prefix-cache node."""
        return self.pool.num_free

    @property
    def num_cached(self) -> int:
        """Pages the prefix cache indexes (0 when it is off)."""
        return self.prefix_cache.num_pages if self.prefix_cache is not None else 0

    def eviction_log(self, wanted=lambda: True) -> EvictionLog | None:
        """Records prefix-cache evictions from now on, while `wanted()` is true (an entry costs
        a token path), into the returned EvictionLog; None when the prefix cache is off. One
        log at a time: a new one replaces the last."""
        if self.prefix_cache is None:
            return None
        log = EvictionLog(self.prefix_cache)
        self.prefix_cache.on_evict = lambda node, n: log.record(node, n) if wanted() else None
        return log

    def shared_prompt_len(self, req: Request) -> int:
        """Prompt tokens in full pages that every sample of the prompt computes identically."""
        return (len(req.prompt_ids) - 1) // self.page_size * self.page_size

    def match_prefix(self, req: Request) -> None:
        """Starts a request with no pages on the longest cached prefix of its tokens (locked)."""
        if self.prefix_cache is None or req.pages:  # a forked sample already holds its pages
            return
        # Leave at least the last token to compute: its logits give the next token, and the
        # shared page it would rewrite stays untouched.
        pages, node = self.prefix_cache.match(req.all_ids, max_pages=(req.num_tokens - 1) // self.page_size)
        self.pool.incref(pages)
        self.prefix_cache.lock(node)
        req.pages, req.cache_node = list(pages), node
        req.num_computed_tokens = len(pages) * self.page_size

    def unmatch(self, req: Request) -> None:
        """Undoes match_prefix for a request that could not be admitted after all."""
        if req.cache_node is None and req.pages:  # a forked sample keeps its shared pages
            return
        if self.prefix_cache is not None and req.cache_node is not None:
            self.prefix_cache.unlock(req.cache_node)
            req.cache_node = None
        self.pool.decref(req.pages)
        req.pages, req.num_computed_tokens = [], 0

    def grow(self, req: Request, num_tokens: int) -> bool:
        """Gives req pages for num_tokens from free pages, evicting unlocked prefix-cache pages
        when short. False if that is not enough (req gets nothing; evictions stay done)."""
        need = self.pages_short(req, num_tokens)
        if need <= 0:
            return True
        while need > self.pool.num_free:
            if self.prefix_cache is None or not self.prefix_cache.evict(need - self.pool.num_free):
                return False
        req.pages += self.pool.allocate(need)
        return True

    def pages_short(self, req: Request, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size) - len(req.pages)

    def fork(self, leader: Request) -> list[Request]:
        """Starts the prompt's other samples on the leader's full prompt pages (refcounted);
        returns them (they compute only the prompt's tail themselves, so no page is ever
        written by two requests)."""
        shared = self.shared_prompt_len(leader)
        pages = leader.pages[:shared // self.page_size]
        followers, leader.followers = leader.followers, []
        for f in followers:
            self.pool.incref(pages)
            f.pages, f.num_computed_tokens = list(pages), shared
        return followers

    def unfork(self, leader: Request, followers: list[Request]) -> None:
        """Undoes fork: the leader's pages were not written after all (the step that was to
        write them was never launched). The followers hold nothing again; the leader will
        start them."""
        for f in followers:
            self.pool.decref(f.pages)
            f.pages, f.num_computed_tokens = [], 0
        leader.followers = followers

    def cache_computed(self, req: Request) -> None:
        """Indexes the request's fully computed pages and moves its lock to the deepest one."""
        if self.prefix_cache is None:
            return
        node = self.prefix_cache.insert(req.all_ids[:req.num_computed_tokens], req.pages)
        self.prefix_cache.lock(node)
        if req.cache_node is not None:
            self.prefix_cache.unlock(req.cache_node)
        req.cache_node = node

    def release(self, req: Request) -> None:
        """Indexes a finished/aborted/preempted request's full computed pages in the prefix
        cache, then returns its pages to the pool."""
        if self.prefix_cache is not None:
            self.prefix_cache.insert(req.all_ids[:req.num_computed_tokens], req.pages)
            if req.cache_node is not None:
                self.prefix_cache.unlock(req.cache_node)
            req.cache_node = None
        self.pool.decref(req.pages)
        req.pages = []

    def drop(self, req: Request) -> None:
        """Returns a request's pages to the pool without indexing them (their K/V went to the
        host tier: a swapped-out paused request)."""
        if self.prefix_cache is not None and req.cache_node is not None:
            self.prefix_cache.unlock(req.cache_node)
        req.cache_node = None
        self.pool.decref(req.pages)
        req.pages = []

    def extend(self, req: Request, num_tokens: int) -> bool:
        """Pages for num_tokens from the free pool only (no eviction); False if short."""
        need = self.pages_short(req, num_tokens)
        if need > self.pool.num_free:
            return False
        if need > 0:
            req.pages += self.pool.allocate(need)
        return True
