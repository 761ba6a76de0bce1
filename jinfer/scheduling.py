"""The scheduling mechanism: token budgets, pages, preemption. Who goes first is a policy."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Collection, Sequence

from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.drafting import Drafting
from jinfer.kv_manager import KVManager
from jinfer.migration import Migration
from jinfer.pausing import Discard, PausePolicy, PauseStats, Pausing
from jinfer.request import Request, Status
from jinfer.scheduling_policy import FCFS, AdmissionRefused, SchedulingPolicy
from jinfer.settling import Settling
from jinfer.speculation import DraftBudget, Drafter
from jinfer.step_plan import PENDING, ScheduledSeq, SpecStats, StepPlan


@dataclasses.dataclass
class _StepBuild:
    """A plan being built by Scheduler.schedule: the token budget left, the sequences planned
    (and their requests' ids), the requests preempted, the decodes that may get a draft."""

    budget: int
    drafts: bool
    interleave: bool
    seqs: list[ScheduledSeq] = dataclasses.field(default_factory=list)
    preempted: list[str] = dataclasses.field(default_factory=list)
    swap_out: list[tuple[str, tuple[int, ...]]] = dataclasses.field(default_factory=list)
    swap_in: list[tuple[str, tuple[int, ...]]] = dataclasses.field(default_factory=list)
    swap_budget: object = ...  # tokens its swaps may still move (None: no limit; ...: not asked yet)
    planned: set[int] = dataclasses.field(default_factory=set)  # id() of the requests planned
    decoders: list[tuple[int, Request]] = dataclasses.field(default_factory=list)  # (index in seqs, request)
    blocked: bool = False  # a waiting request could not get pages: the ones after it wait too

    def add(self, seq: ScheduledSeq, req: Request, n: int) -> None:
        self.seqs.append(seq)
        self.planned.add(id(req))
        self.budget -= n


class Scheduler(Settling, Drafting, Migration, Pausing):
    """The mechanism: plans steps (schedule) within a token budget and the pages free, in the
    policy's order. Settling steps (update: settling.py), drafts (drafting.py), requests moving
    between schedulers (migration.py) and pauses at tool calls (pausing.py) are its mixins."""

    def __init__(self, cache_cfg: CacheConfig, sched_cfg: SchedulerConfig, num_pages: int,
                 policy: SchedulingPolicy | None = None, drafter: Drafter | None = None,
                 max_spec_tokens: int = 0, budget: DraftBudget | None = None,
                 pause_policy: PausePolicy | None = None, clock: Callable[[], float] = time.monotonic, *,
                 eos_ids: Collection[int] = (), drafts_in_flight: bool = False):
        """drafter, max_spec_tokens: speculative decoding (jinfer.speculation): decoding
        requests get drafts of up to max_spec_tokens tokens to verify in their step; budget
        (optional) trims each request's draft to what is worth its cost. pause_policy: what
        happens to the K/V of requests paused for a tool call (jinfer.pausing; default
        Discard), asked before every step; clock: the time base of their pauses. eos_ids: the
        tokens that end a request (unless its params ignore EOS). drafts_in_flight: a step may
        be planned while the one before, carrying drafts, is not yet settled: the drafts
        count as accepted (Request.tentative) and the runner corrects the positions on the
        device (jinfer/drafting.py); False: a step with drafts is settled before the next one
        is planned (the simulators, engines without async scheduling)."""
        self.budget = budget
        self.eos_ids = frozenset(eos_ids)
        self.cfg = sched_cfg
        self.token_limit: int | None = None  # a tighter step budget (the engine's, while buckets compile)
        self.drafter = drafter if max_spec_tokens > 0 else None
        self.max_spec_tokens = max_spec_tokens if drafter is not None else 0
        self.trees = self.max_spec_tokens > 0  # tree drafts verified as trees (the engine sets
        # False where the runner cannot mask them: each tree's leading chain is drafted instead)
        self.token_buckets: tuple[int, ...] | None = None  # the runner's step sizes (the engine sets them:
        # drafts are fitted to them, Drafting._fit_to_buckets); None: unknown, drafts as drafted
        self._drafting: set[str] = set()  # requests the drafter has been told about (start)
        self._num_decoding = 0  # running requests with one token to compute (this step)
        self.drafts_in_flight = drafts_in_flight
        self.closed_batch = False
        """No request will arrive until the running and waiting ones are done (Engine.generate
        sets it for its run): drafts keep to the budget's lead limit (Drafting._lead_rooms)."""
        self._unsettled_draft = False  # a planned step carries drafts the next plan cannot follow
        # (any, without drafts_in_flight) and update has not seen it
        self._forked: list[tuple[Request, list[Request]]] = []  # the last plan's forks (unplan undoes them)
        self.spec = SpecStats()
        self.page_size = cache_cfg.page_size
        self.kv = KVManager(num_pages, cache_cfg.page_size, cache_cfg.enable_prefix_cache)
        self.pool, self.prefix_cache = self.kv.pool, self.kv.prefix_cache  # read-only views
        self.policy = policy or FCFS()
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.paused: list[Request] = []  # sampled an intercept token; resume() requeues them
        self._swap_rest: list[Request] = []  # resumed while their swap was under way: the rest goes out next
        self._restoring: list[Request] = []  # resumed, swapped chunks coming back in (until admitted)
        self.pause_policy = pause_policy or Discard()
        self.clock = clock
        self.last_step_s = 0.0  # observe_step's last
        self._starved = False  # the last plan was empty while requests waited and paused ones held pages
        self._max_arrival = 0  # the latest arrival_index added (a requeued resume goes after it)
        self.pause_stats = PauseStats()
        self.num_scheduled_tokens = 0  # tokens of every plan (recomputation included), less unplanned ones

    # -- admission and release -------------------------------------------------------------

    def admit(self, req: Request) -> None:
        """Raises AdmissionRefused if the policy's admission check refuses req (not queued)."""
        check = getattr(self.policy, "admit", None)
        reason = check(req, self) if check is not None else None
        if reason:
            raise AdmissionRefused(reason)

    def add(self, req: Request) -> None:
        self._max_arrival = max(self._max_arrival, req.arrival_index)
        self.waiting.append(req)

    def observe_step(self, num_tokens: int, seconds: float, emitted: int | None = None,
                     drafted: bool = False, *, num_decoding: int = 0, decode_only: bool = False,
                     drafting: bool | None = None, pipelined: bool | None = None) -> None:
        """A step of num_tokens took `seconds`: the policy hears it (if it listens), and with
        emitted (the tokens its settling appended) the draft budget too (drafted: the step
        carried drafts; num_decoding: its decoding sequences; decode_only: no prompt chunk;
        drafting: it was planned in drafting mode, None: the budget takes drafted; pipelined:
        its time is one pipeline period (it was dispatched before the step ahead of it was
        read) or the whole step, None: unknown)."""
        self.last_step_s = seconds
        hook = getattr(self.policy, "observe_step", None)
        if hook is not None:
            hook(num_tokens, seconds)
        if emitted is not None and self.budget is not None:
            self.budget.observe_step(num_tokens, seconds, emitted, drafted, num_decoding=num_decoding,
                                     decode_only=decode_only, drafting=drafting, pipelined=pipelined)

    def reached_length(self, req: Request, *, pending: bool) -> bool:
        """The length rule: max_tokens outputs, or max_model_len tokens in all. pending: count
        tokens sampled but not read yet and drafts in flight (planning) or only read ones
        (finishing)."""
        out = len(req.output_ids) + (req.num_pending + req.num_tentative if pending else 0)
        return out >= req.params.max_tokens or len(req.prompt_ids) + out >= self.cfg.max_model_len

    def abort(self, reqs: Sequence[Request]) -> None:
        """Stops requests (a request's n samples) wherever they are; their pages are released,
        their steps in flight ignored. One pass over the queues, whatever len(reqs)."""
        gone = {id(r) for r in reqs}
        self._drop_from_queues(gone)
        for req in reqs:
            req.status, req.finish_reason, req.pause = Status.FINISHED, "abort", None
            self.release(req)
            req.followers = []
            self._end_drafting(req, aborted=True)

    def _drop_from_queues(self, gone: set[int]) -> None:
        self.running = [r for r in self.running if id(r) not in gone]
        self.waiting = [r for r in self.waiting if id(r) not in gone]
        self.paused = [r for r in self.paused if id(r) not in gone]
        self._swap_rest = [r for r in self._swap_rest if id(r) not in gone]
        self._restoring = [r for r in self._restoring if id(r) not in gone]

    def release(self, req: Request) -> None:
        """Returns a finished/aborted/preempted request's pages (its full computed ones indexed
        in the prefix cache first)."""
        self.kv.release(req)

    def on_prefill_done(self, req: Request) -> None:
        """Shares the prompt's pages with requests that arrive while this one decodes."""
        if req.status is Status.RUNNING:
            self.kv.cache_computed(req)

    def _ensure_pages(self, req: Request, num_tokens: int) -> bool:
        """Gives req pages for num_tokens: free ones first, then evicted prefix-cache pages,
        then pages that waiting forked samples hold (they restart from the prefix cache)."""
        while not self.kv.grow(req, num_tokens):
            holders = [w for w in self.waiting if w.pages and w is not req
                       and (w.pause is None or not w.pause.restoring)]  # (a restore's pages hold swapped K/V)
            if not holders:
                return False
            victim = max(holders, key=self.policy.priority)
            self.release(victim)
            victim.num_computed_tokens = 0
        return True

    def preempt(self, req: Request) -> None:
        """Recompute-style preemption of a running request: its KV dropped, its tokens kept,
        back to the front of the waiting queue (schedule() calls it to make room; tests watch
        it)."""
        self.release(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.running.remove(req)
        self.waiting.insert(0, req)

    # -- one step --------------------------------------------------------------------------

    def schedule(self, drafts: bool = True) -> StepPlan:
        """The next step's plan. Every request has num_computed_tokens and a target num_tokens
        (prompt + output); the step hands out a token budget so the first catches up with the
        second, in policy order: running requests first (decodes and ongoing chunks), then
        waiting ones; or, when the policy interleaves, one order over both. Prefill, chunked
        prefill, prefix hits and decode are the same path. Drafts come last, from what the
        step left; followers of a request whose shared prompt is written join the queue."""
        hook = getattr(self.policy, "on_schedule", None)
        if hook is not None:
            hook(self)
        budget = self.cfg.max_num_batched_tokens
        if self.token_limit is not None:
            budget = min(budget, self.token_limit)
        step = _StepBuild(budget, drafts and self.drafter is not None, bool(getattr(self.policy, "interleave", False)))
        assert not self._unsettled_draft, "a step with drafts must be settled before the next is planned"
        if step.drafts and not self.drafts_in_flight:
            assert not any(r.num_pending for r in self.running + self.waiting), (
                "drafts are planned on read tokens: settle the step in flight first")
        self._decide_pauses(step)
        self._admit_restored(step)
        for req, was_running in self._order(step.interleave):
            if step.budget == 0 or len(step.seqs) == self.cfg.max_num_seqs:
                break
            if was_running:
                self._schedule_running(step, req)
            elif not self._schedule_waiting(step, req):
                break
        # Nothing could run while paused requests hold pages: the next step drops their K/V
        # whatever the pause policy says (a preference, not a reason to stall).
        self._starved = (not step.seqs and not step.swap_in and bool(self.waiting)
                         and any(r.pages for r in self.paused))
        self._plan_drafts(step)
        self._fork_followers()
        plan = StepPlan(tuple(step.seqs), tuple(step.preempted), tuple(step.swap_out), tuple(step.swap_in))
        self.num_scheduled_tokens += budget - step.budget  # (every token planned took budget)
        return plan

    def _schedule_running(self, step: "_StepBuild", req: Request) -> None:
        """Plans a running request's next tokens; one that cannot get pages preempts the
        lowest-priority running request not yet planned this step (itself, last)."""
        if req.status is not Status.RUNNING or id(req) in step.planned or self._done_sampling(req):
            return  # preempted by this step, restored before the others, or its last token is pending
        n = min(req.num_tokens - req.num_computed_tokens, step.budget)
        self._make_room(step, req, n,
                        lambda: next(r for r in reversed(self.running) if r is req or id(r) not in step.planned))
        if req.status is not Status.RUNNING:
            return
        if step.drafts and self._may_draft(req, n):
            step.decoders.append((len(step.seqs), req))
        step.add(self._plan(req, n), req, n)

    def _schedule_waiting(self, step: "_StepBuild", req: Request) -> bool:
        """Admits a waiting request if it gets pages. Only interleaved orders preempt for it (and
        hold the running set within max_num_seqs: requests sitting a step out keep their seats
        unless a lower-ranked one makes room); after a request that could not get in, the ones
        behind it wait too. A resumed request swapped out gets its K/V back (in chunks within
        the step's swap budget: it waits restoring, jinfer.pausing, without holding up the
        ones behind it, and runs before the others once all is in). False: stop planning this
        step."""
        restoring = req.pause is not None and req.pause.restoring
        if restoring and req.pause.swap_chunks:
            return True  # its chunks still coming back in (each step's first swaps)
        if step.blocked or req.status is not Status.WAITING or self._done_sampling(req) or req.tentative:
            return True  # a preempted request with its last token pending finishes when that is read;
            # one with drafts in flight waits for them to be read (its tokens are not known yet)
        if req.pause is not None and req.pause.swapped_tokens and not restoring and not self._comes_in_whole(req, step):
            return self._start_restore(step, req)  # (before the seat: it takes none while restoring)
        victim_of = (lambda: self._preemptable(req, step.planned)) if step.interleave else (lambda: None)
        if step.interleave and len(self.running) >= self.cfg.max_num_seqs:
            victim = victim_of()
            if victim is None:
                step.blocked = True
                return True
            self.preempt(victim)
            step.preempted.append(victim.request_id)
        resumed = req.pause is not None  # resumed after a tool call
        swapped = req.pause.swapped_tokens if resumed and not restoring else 0  # its K/V in the host tier
        if swapped:  # (at least its last token computed again: its logits give the next one)
            req.num_computed_tokens = min(swapped, req.num_tokens - 1)
        elif not restoring:
            self.kv.match_prefix(req)
        first_admission = req.num_preemptions == 0
        n = min(req.num_tokens - req.num_computed_tokens, step.budget)
        if restoring:  # its K/V all back in the pages it holds: it runs on them
            n = min(n, max(1, len(req.pages) * self.page_size - req.num_computed_tokens))
        if not self._make_room(step, req, n, victim_of):
            if resumed and req.pause.action == "preserve":
                # Its own pages (and the cached prefix it locks) may be what leaves no room: they
                # go into the prefix cache, where its next try matches what is still there.
                self.release(req)
                req.num_computed_tokens, req.pause.action = 0, "discard"
            elif not restoring:
                self.kv.unmatch(req)
            step.blocked = True
            return step.interleave
        if swapped:  # all of it now (_comes_in_whole), from position 0
            req.num_computed_tokens = 0
            self._swap_in(req, step, least=len(req.pause.swap_chunks))
        if restoring:
            self._restoring.remove(req)
        if resumed:
            self._resumed_admitted(req, req.num_computed_tokens)
        self._admit(req, first_admission)
        step.add(self._plan(req, n), req, n)
        return True

    def _make_room(self, step: "_StepBuild", req: Request, n: int, victim_of: Callable) -> bool:
        """Pages for req's next n tokens, preempting victim_of()'s picks until they fit. False
        when there is no victim left or req itself was the one preempted."""
        while not self._ensure_pages(req, req.num_computed_tokens + n):
            victim = victim_of()
            if victim is None:
                return False
            self.preempt(victim)
            step.preempted.append(victim.request_id)
            if victim is req:
                return False
        return True

    def _admit(self, req: Request, first_admission: bool) -> None:
        """A waiting request becomes running; on its first admission the drafter starts
        hearing every token it gets."""
        if first_admission:
            req.num_cached_prompt_tokens = req.num_computed_tokens
            self._start_drafting(req)
        self.waiting.remove(req)
        req.status = Status.RUNNING
        self.running.append(req)

    def _plan_drafts(self, step: "_StepBuild") -> None:
        """Drafts from what the step left, cut to fit the runner's token buckets (the budget's
        call: Drafting._fit_to_buckets), then given pages from the free ones (no eviction), so a
        draft never preempts a request, delays an admission or evicts a prefix someone could
        match."""
        self._num_decoding = len(step.decoders)
        lead = self._lead_rooms(step.decoders)
        base = sum(len(seq.token_ids) for seq in step.seqs)
        drafted = []
        for i, req in step.decoders:
            if step.budget == 0:
                break
            draft = self._draft(req, min(step.budget, lead(req)))
            if draft.tokens:
                drafted.append((i, req, draft))
                step.budget -= len(draft)
        for (i, req, draft), k in zip(drafted, self._fit_to_buckets(base, drafted)):
            step.budget += len(draft)
            if k and self.kv.extend(req, req.num_computed_tokens + k):  # (never evicts)
                step.seqs[i] = self._add_draft(step.seqs[i], req, draft.truncate(k))
                step.budget -= k
                self._unsettled_draft |= self.read_first(step.seqs[i])

    def read_first(self, seq: ScheduledSeq) -> bool:
        """Whether the step carrying seq must be read before the next is planned: it has a draft
        and drafts are not in flight."""
        return bool(seq.num_draft) and not self.drafts_in_flight

    def _fork_followers(self) -> None:
        """Samples n > 1: a request's followers join from the next step, once its shared prompt's
        pages are written (this plan's forks are kept for unplan)."""
        self._forked = []
        for req in self.running:
            if req.followers and req.num_computed_tokens >= self.kv.shared_prompt_len(req):
                followers = self.kv.fork(req)
                self._forked.append((req, followers))
                self.waiting += followers

    def unplan(self, plan: StepPlan, reqs: Sequence[Request]) -> None:
        """Takes back the last schedule()'s plan, which never ran (building it failed): its
        tokens count as not computed again, its samples as not pending, and the followers it
        forked onto pages it was to write hold nothing again. What stays is consistent without
        it: pages the plan gave stay with their requests, requests it admitted stay running
        and those it preempted waiting, prefix-cache evictions stay done, and a drafter that
        proposed for the plan hears nothing of it (its next observe is the next settled step)."""
        self.num_scheduled_tokens -= plan.num_tokens
        for seq, req in zip(plan.seqs, reqs):
            req.num_computed_tokens = seq.start_pos
            req.num_pending -= seq.sample
            if seq.num_draft:
                req.num_tentative -= len(req.tentative.pop())
        for leader, followers in self._forked:
            gone = {id(f) for f in followers}
            self.waiting = [r for r in self.waiting if id(r) not in gone]
            self.kv.unfork(leader, followers)
        self._forked = []
        self._unsettled_draft = False

    def _order(self, interleave: bool):
        """(request, whether it was running) for every request one step considers, in the
        order it considers them."""
        if interleave:
            self.running.sort(key=self.policy.priority)
            both = [(r, True) for r in self.running] + [(r, False) for r in self.waiting]
            yield from sorted(both, key=lambda p: self.policy.priority(p[0]))
            return
        self.running.sort(key=self.policy.priority)
        yield from ((r, True) for r in list(self.running))
        self.waiting.sort(key=self.policy.priority)  # after the running ones' preemptions
        yield from ((r, False) for r in list(self.waiting))

    def _preemptable(self, req: Request, planned: set[int]) -> Request | None:
        """The running request `req` (short of pages) may preempt: the lowest-priority one not
        planned this step, if it ranks below req and the policy allows it; else None."""
        allow = getattr(self.policy, "may_preempt", None)
        if allow is None:
            return None
        candidates = [r for r in self.running if id(r) not in planned]
        if not candidates:
            return None
        victim = max(candidates, key=self.policy.priority)
        if not self.policy.priority(req) < self.policy.priority(victim) or not allow(req, victim):
            return None
        return victim

    def _done_sampling(self, req: Request) -> bool:
        return self.reached_length(req, pending=True)

    def _plan(self, req: Request, n: int) -> ScheduledSeq:
        """Plans n tokens of req and counts them computed (the step will write them; update
        rolls back the rejected part of a draft added later by _add_draft)."""
        start = req.num_computed_tokens
        known = req.ids(start, start + n)
        token_ids = tuple(known) + (PENDING,) * (n - len(known))
        sample = start + n == req.num_tokens
        seq = ScheduledSeq(
            request_id=req.request_id, token_ids=token_ids, start_pos=start,
            pages=tuple(req.pages), sample=sample, params=req.params, seed=req.seed,
            sample_group=req.sample_group, sample_index=req.num_output_tokens)
        req.num_computed_tokens += n
        req.num_pending += sample
        return seq

    def finish(self, req: Request) -> None:
        """Releases a finished or aborted request (and any of its samples still held back)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.release(req)
        req.followers = []
        self._end_drafting(req, aborted=False)
