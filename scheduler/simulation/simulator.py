"""Discrete-event simulation of N replicas behind a router, with a cost model for a clock.

The routing driver over the simulation core (core.py): each replica is a SimReplica (jinfer's
own Scheduler with the device replaced by `CostModel.step_time` of the plan it produced; no
JAX anywhere). Routers are the same objects the live router uses; replicas
report first tokens, finishes and prefix-cache evictions to them as the engine would, and their
load (free pages, queue) whenever one of their requests finishes.

SLO tiers (jinfer.config.Tier): given the tier table, each request carries its WorkItem's tier
and that tier's rank as its priority, as the server gives them, and a scheduling policy per
replica (scheduler/slo/policies.py) reads the simulation clock; `SimResult.tier_stats` then judges every
request by its tier's TTFT and TPOT targets (attainment, goodput).
Deterministic: the same workload, router and config give the same records.
"""

from __future__ import annotations

from jinfer.config import Tier
from jinfer.request import Request
from scheduler.cost_model import CostModel
from scheduler.routing.policies import ReplicaLoad, RouteRequest, Router
from scheduler.simulation.core import EventQueue, ReplicaConfig, SimReplica, greedy, tool_tokens
from jinfer.records import RequestRecord
from scheduler.simulation.records import SimResult
from scheduler.simulation.workloads import WorkItem

__all__ = ["ReplicaConfig", "RequestRecord", "SimResult", "Simulator"]

_ARRIVAL, _STEP_DONE, _TOOL_DONE = 0, 1, 2


class Simulator:
    """fast_forward: a replica whose every running request is decoding, with nothing waiting,
    runs the stretch up to its next finish as one event (truncated at the step in progress if
    a request arrives there meanwhile); records equal step-by-step simulation (tested)."""

    def __init__(self, router: Router, num_replicas: int, cost: CostModel, replica: ReplicaConfig = ReplicaConfig(),
                 fast_forward: bool = True, speculation=None, tiers: tuple[Tier, ...] = (), policy=None,
                 pause_policy=None):
        """speculation: a callable returning (drafter, max_spec_tokens, draft budget or None)
        for each replica (jinfer.speculation): drafts ride in the replicas' steps exactly as
        in the engine, costed by the cost model, and are verified against each request's
        WorkItem.output (the tokens the model will write). Steps then run one by one.

        tiers: SLO tiers, highest first (e.g. ServingConfig.tier_table): a request gets the Tier
        its WorkItem.tier names (the first when empty) and its rank as priority, as the server
        gives them; a name not among them is a ValueError. Empty: tiers ignored.
        policy: a callable(clock) -> SchedulingPolicy, called once per replica, e.g.
        `lambda clock: SloAware(clock=clock)`; clock() is the simulation time (the time base of
        Request.arrival_time and first_token_time). The replicas report every step's size and
        cost-model time to it (Scheduler.observe_step) and run its admission check. A policy
        that revises itself every step (on_schedule) or learns from the steps (observe_step)
        turns fast-forward off, since a fast-forwarded stretch has steps it would not see.
        None: FCFS within tiers (or ReplicaConfig.priority_groups).
        pause_policy: a callable(clock) -> jinfer.pausing.PausePolicy per replica, for work items
        with tool calls (WorkItem.tool_calls: each pauses there for its tool's time and resumes
        with its tokens; swaps cost ReplicaConfig.swap_s_per_page); None: Discard. Items with
        tool calls turn fast-forward off."""
        if policy is not None and replica.priority_groups:
            raise ValueError("give either policy= or ReplicaConfig(priority_groups=True), not both")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names {names} must be distinct")
        self.router, self.cost, self.cfg, self.tiers = router, cost, replica, tuple(tiers)
        self._tier_rank = {t.name: (rank, t) for rank, t in enumerate(self.tiers)}
        self.now = 0.0  # simulation time, what a policy's clock reads
        clock = lambda: self.now  # noqa: E731
        self._outputs: dict[int, tuple[int, ...]] = {}
        self.tool_end: dict[str, float] = {}
        """Request id -> when its current (or last) tool call returns: an oracle for pause
        policies that take the remaining pause time (scheduler.infercept.policies.InferCept)."""
        self.replicas = [SimReplica(replica, cost, policy(clock) if policy is not None else None, speculation,
                                    self._outputs, pause_policy(clock) if pause_policy is not None else None, clock)
                         for _ in range(num_replicas)]
        for rep in self.replicas:
            rep.evictions = rep.sched.kv.eviction_log()
        per_step = any(hasattr(rep.sched.policy, hook) for rep in self.replicas
                       for hook in ("on_schedule", "observe_step"))
        self.fast_forward = fast_forward and speculation is None and not per_step

    def _tier(self, index: int, name: str) -> tuple[int, Tier | None]:
        """(priority, Tier) of a request whose WorkItem names tier `name`."""
        if not self.tiers:
            return 0, None
        if not name:
            return 0, self.tiers[0]
        if name not in self._tier_rank:
            raise ValueError(f"request {index}: tier={name!r} is not one of the simulator's tiers "
                             f"{[t.name for t in self.tiers]}")
        return self._tier_rank[name]

    def run(self, items: list[WorkItem]) -> SimResult:
        if any(isinstance(it.prompt, str) for it in items):
            raise ValueError("the simulator needs token-id prompts (text has no token count without a tokenizer)")
        tiers = [self._tier(i, it.tier) for i, it in enumerate(items)]
        if any(it.tool_calls for it in items):
            self.fast_forward = False  # a stretch would run past a tool call
        events = self._events = EventQueue()
        for i, it in enumerate(items):
            events.push(it.arrival_s, _ARRIVAL, i)
        records: list[RequestRecord] = [None] * len(items)
        steps, now = 0, 0.0
        while events:
            now, kind, data = events.pop()
            self.now = now
            if kind == _ARRIVAL:
                records[data] = self._arrive(items[data], data, tiers[data], now)
            elif kind == _TOOL_DONE:
                r, index, request_id = data
                rep = self.replicas[r]
                records[index].tool_s += rep.resume(index, request_id)
                if not rep.busy:
                    self._start(r, now)
            else:
                r, gen = data
                rep = self.replicas[r]
                if gen != rep.gen:
                    continue  # replaced by a truncated fast-forward
                steps += len(rep.ends)
                self._finish_step(r, now)
                self._start(r, now)
        return SimResult(records, now, steps, self.tiers)

    def _arrive(self, it: WorkItem, index: int, tier: tuple[int, Tier | None], now: float) -> RequestRecord:
        n = len(it.prompt)
        priority, tier = tier
        name = tier.name if tier is not None else ""
        if not self.cfg.fits(n, tool_tokens(it)):
            return RequestRecord(index, -1, now, n, error="prompt + max_tokens exceeds the replica", tier=name)
        rreq = RouteRequest(str(index), tuple(it.prompt), it.max_tokens)
        r = self.router.route(rreq, now)
        rec = RequestRecord(index, r, now, n, tier=name)
        rep = self.replicas[r]
        # With tools: segments end at their MARKER or END token, before any length limit.
        longest = max([it.max_tokens] + [c.after_tokens + 1 for c in it.tool_calls])
        req = Request(rreq.request_id, list(it.prompt), greedy(longest, bool(it.tool_calls)), 0, now, index,
                      priority=priority, tier=tier)
        if not rep.admit(req, rec, rreq):
            self.router.on_finish(r, rreq, now)
            return rec
        if it.output:
            self._outputs[index] = it.output
        if it.tool_calls:
            rep.tools[index] = it
        if not rep.busy:
            self._start(r, now)
        elif len(rep.ends) > 1:  # stop the fast-forward after the step in progress
            k = next(j for j, end in enumerate(rep.ends) if end >= now) + 1
            if k < len(rep.ends):
                del rep.ends[k:]
                rep.gen += 1
                self._events.push(rep.ends[-1], _STEP_DONE, (r, rep.gen))
        return rec

    def _start(self, r: int, now: float) -> None:
        rep = self.replicas[r]
        dt = rep.start(now, drafts=rep.sched.wants_drafts())
        if rep.evictions:  # scheduling is where the cache evicts; report as a replica would
            for tokens, keep in rep.evictions.drain():
                self.router.on_evict(r, tokens, keep)
        if dt is None:
            return
        if self.fast_forward:
            self._plan_stretch(rep, dt)
        self._events.push(rep.ends[-1], _STEP_DONE, (r, rep.gen))

    def _plan_stretch(self, rep: SimReplica, dt: float) -> None:
        """Extends rep.ends over the pure-decode steps that follow this plan unchanged."""
        sched, plan = rep.sched, rep.plan
        if sched.waiting or len(plan.seqs) != len(sched.running):
            return
        if any(len(s.token_ids) != 1 or not s.sample for s in plan.seqs):
            return
        reqs = [rep.reqs[s.request_id][0] for s in plan.seqs]
        # Steps until the first request finishes (this plan's step included).
        k = min(min(r.params.max_tokens - len(r.output_ids), self.cfg.max_model_len - len(r.prompt_ids) - len(r.output_ids) + 1)
                for r in reqs)
        page, free = self.cfg.page_size, sched.kv.num_free
        while k > 1:  # pages for the extra steps must come from the free pool (no eviction)
            need = sum(-(-(r.num_computed_tokens + k - 1) // page) - len(r.pages) for r in reqs)
            if need <= free:
                break
            k //= 2
        grow = (self.cost.per_attn_s + self.cost.per_kv_s) * len(reqs)  # each step: one more context token each
        end = rep.ends[0]
        for j in range(1, k):
            end += dt + grow * j
            rep.ends.append(end)

    def _finish_step(self, r: int, now: float) -> None:
        rep = self.replicas[r]
        sched = rep.sched
        # the plan's own step and the fast-forwarded ones after it (_plan_stretch checked their pages
        # free; a policy or budget that listens runs without fast-forward)
        settled = rep.settle(now, repeats=len(rep.ends))
        finished = False
        for done, rec, rreq, first in settled:
            if first:
                self.router.on_first_token(r, rreq, now, now - rec.arrival_s)
            if done.paused:
                call = rep.tools[rec.index].tool_calls[rep.segment.get(rec.index, 0)]
                self.tool_end[rreq.request_id] = now + call.pause_s
                self._events.push(now + call.pause_s, _TOOL_DONE, (r, rec.index, rreq.request_id))
            if done.finish_reason:
                if rec.index in self._outputs:
                    rec.output_ids = tuple(done.req.output_ids)
                self.router.on_finish(r, rreq, now)
                finished = True
        if finished:  # (finishes fall on the same steps with or without fast-forward)
            self.router.on_load(r, ReplicaLoad(len(sched.waiting), len(sched.running), self.cfg.num_pages,
                                               sched.kv.num_free, sched.kv.num_cached,
                                               self.cfg.page_size, len(rep.reqs)), now)
