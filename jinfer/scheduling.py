"""The scheduling mechanism: token budgets, pages, preemption. Who goes first is a policy."""

from __future__ import annotations

import dataclasses
from typing import Protocol

from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.page_pool import PagePool
from jinfer.prefix_cache import PrefixCache
from jinfer.request import Request, Status
from jinfer.sampling_params import SamplingParams


class SchedulingPolicy(Protocol):
    """Orders requests; the scheduler admits and keeps them in this order."""

    def priority(self, req: Request):
        """Smaller runs first and is preempted last."""


class FCFS:
    def priority(self, req: Request):
        return (req.priority, req.arrival_index)


@dataclasses.dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step: compute `token_ids` at positions start_pos, start_pos+1, ..."""

    request_id: str
    token_ids: tuple[int, ...]
    start_pos: int
    pages: tuple[int, ...]  # the request's page table after allocation
    sample: bool  # the step reaches the request's last token: sample the next one
    params: SamplingParams
    seed: int
    sample_index: int  # len(output_ids): keys the per-token random stream


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The only thing the runner sees of a step."""

    seqs: tuple[ScheduledSeq, ...]
    preempted: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


class Scheduler:
    def __init__(self, cache_cfg: CacheConfig, sched_cfg: SchedulerConfig, num_pages: int,
                 policy: SchedulingPolicy | None = None):
        self.cfg = sched_cfg
        self.page_size = cache_cfg.page_size
        self.pool = PagePool(num_pages)
        self.prefix_cache = PrefixCache(self.pool, self.page_size) if cache_cfg.enable_prefix_cache else None
        self.policy = policy or FCFS()
        self.waiting: list[Request] = []
        self.running: list[Request] = []

    # -- admission and release -------------------------------------------------------------

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def free(self, req: Request) -> None:
        """Returns a finished/aborted/preempted request's pages (indexing full ones first)."""
        if self.prefix_cache is not None:
            self.prefix_cache.insert(req.all_ids[:req.num_computed_tokens], req.pages)
            if req.cache_node is not None:
                self.prefix_cache.unlock(req.cache_node)
            req.cache_node = None
        self.pool.decref(req.pages)
        req.pages = []

    def _cache_computed(self, req: Request) -> None:
        """Indexes the request's fully computed pages and moves its lock to the deepest one."""
        computed = req.all_ids[:req.num_computed_tokens]
        node = self.prefix_cache.insert(computed, req.pages)
        self.prefix_cache.lock(node)
        if req.cache_node is not None:
            self.prefix_cache.unlock(req.cache_node)
        req.cache_node = node

    def on_prefill_done(self, req: Request) -> None:
        """Shares the prompt's pages with requests that arrive while this one decodes."""
        if self.prefix_cache is not None:
            self._cache_computed(req)

    def _match_prefix(self, req: Request) -> None:
        if self.prefix_cache is None:
            return
        pages, node = self.prefix_cache.match(req.all_ids)
        # Leave at least the last token to compute: its logits give the next token, and the
        # shared page it would rewrite stays untouched.
        keep = min(len(pages), (req.num_tokens - 1) // self.page_size)
        for _ in range(len(pages) - keep):
            node = node.parent
        pages = pages[:keep]
        self.pool.incref(pages)
        self.prefix_cache.lock(node)
        req.pages, req.cache_node = list(pages), node
        req.num_computed_tokens = len(pages) * self.page_size

    def _unmatch(self, req: Request) -> None:
        if self.prefix_cache is not None and req.cache_node is not None:
            self.prefix_cache.unlock(req.cache_node)
            req.cache_node = None
        self.pool.decref(req.pages)
        req.pages, req.num_computed_tokens = [], 0

    def _ensure_pages(self, req: Request, num_tokens: int) -> bool:
        need = -(-num_tokens // self.page_size) - len(req.pages)
        if need <= 0:
            return True
        if need > self.pool.num_free and self.prefix_cache is not None:
            self.prefix_cache.evict(need - self.pool.num_free)
        if need > self.pool.num_free:
            return False
        req.pages += self.pool.allocate(need)
        return True

    def _preempt(self, req: Request) -> None:
        """Recompute-style preemption: drop the KV, keep the tokens, go back to waiting first."""
        self.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.running.remove(req)
        self.waiting.insert(0, req)

    # -- one step --------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        # Every request has num_computed_tokens and a target num_tokens (prompt + output).
        # Each step hands out a token budget so the first catches up with the second: running
        # requests first (in policy order; decodes and ongoing chunks), then waiting ones.
        # A running request that cannot get pages preempts the lowest-priority running one.
        # Prefill, chunked prefill, prefix hits and decode are the same path.
        budget = self.cfg.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        preempted: list[str] = []
        self.running.sort(key=self.policy.priority)
        for req in list(self.running):
            if req.status is not Status.RUNNING or len(seqs) == self.cfg.max_num_seqs or budget == 0:
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self._ensure_pages(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                continue
            seqs.append(self._plan(req, n))
            budget -= n

        self.waiting.sort(key=self.policy.priority)
        while self.waiting and budget > 0 and len(seqs) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            self._match_prefix(req)
            first_admission = req.num_preemptions == 0
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._ensure_pages(req, req.num_computed_tokens + n):
                self._unmatch(req)
                break
            if first_admission:
                req.num_cached_prompt_tokens = req.num_computed_tokens
            self.waiting.pop(0)
            req.status = Status.RUNNING
            self.running.append(req)
            seqs.append(self._plan(req, n))
            budget -= n
        return StepPlan(tuple(seqs), tuple(preempted))

    def _plan(self, req: Request, n: int) -> ScheduledSeq:
        start = req.num_computed_tokens
        return ScheduledSeq(
            request_id=req.request_id, token_ids=tuple(req.all_ids[start:start + n]), start_pos=start,
            pages=tuple(req.pages), sample=start + n == req.num_tokens, params=req.params,
            seed=req.seed, sample_index=len(req.output_ids))

    def finish(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.free(req)

