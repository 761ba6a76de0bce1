"""Discrete-event simulation of N replicas behind a router, with a cost model for a clock.

Each replica is jinfer's own Scheduler (token budgets, paged KV pool, prefix cache with its
eviction, chunked prefill, preemption) with the device replaced by `CostModel.step_time` of the
plan it produced; no JAX anywhere. Routers are the same objects the live router uses; replicas
report first tokens, finishes and prefix-cache evictions to them as the engine would, and their
load (free pages, queue) whenever one of their requests finishes.

SLO tiers (jinfer.config.Tier): given the tier table, each request carries its WorkItem's tier
and that tier's rank as its priority, as the server gives them, and a scheduling policy per
replica (scheduler/slo/policies.py) reads the simulation clock; `SimResult.tier_stats` then judges every
request by its tier's TTFT and TPOT targets (attainment, goodput).
Deterministic: the same workload, router and config give the same records.
"""

from __future__ import annotations

import dataclasses
import heapq
import math

import numpy as np

from jinfer.config import CacheConfig, SchedulerConfig, Tier
from jinfer.request import Request
from jinfer.sampling_params import SamplingParams
from jinfer.scheduling import Scheduler
from jinfer.scheduling_policy import AdmissionRefused
from jinfer.speculation import Draft
from scheduler.cost_model import CostModel
from scheduler.routing.policies import ReplicaLoad, RouteRequest, Router
from scheduler.simulation.workloads import WorkItem
from scheduler.slo.priority_groups import PriorityGroups

_ARRIVAL, _STEP_DONE = 0, 1


@dataclasses.dataclass(frozen=True)
class ReplicaConfig:
    page_size: int = 16
    num_pages: int = 25_000
    """Per replica (25k pages x 16 = 400k tokens: a 7B-class model's KV room on one 80 GB GPU)."""
    max_num_batched_tokens: int = 4096
    max_num_seqs: int = 256
    max_model_len: int = 65_536
    priority_groups: bool = False
    """Order each replica's queue by Preble's priority groups instead of FCFS."""

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size


@dataclasses.dataclass
class RequestRecord:
    index: int
    replica: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int = 0
    cached_tokens: int = 0
    first_token_s: float = math.nan
    finish_s: float = math.nan
    error: str = ""
    tier: str = ""
    """Its SLO tier's name (empty when the simulator has no tiers)."""
    preemptions: int = 0  # times it was preempted (recompute) before it finished
    output_ids: tuple[int, ...] = ()
    """The tokens it was given, for a work item with a recorded output in a run without
    fast-forward (a fast-forwarded stretch emits placeholders); empty otherwise."""

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        if self.output_tokens < 2:
            return math.nan
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)


@dataclasses.dataclass
class SimResult:
    records: list[RequestRecord]
    sim_time_s: float
    steps: int
    tiers: tuple[Tier, ...] = ()
    """The simulator's SLO tiers, highest first (what tier_stats judges by)."""

    def stats(self) -> dict:
        ok = [r for r in self.records if not r.error]

        def agg(values):
            v = np.array([x for x in values if not math.isnan(x)])
            if not len(v):
                return {"avg": math.nan, "p50": math.nan, "p99": math.nan}
            return {"avg": float(v.mean()), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}

        prompt = sum(r.prompt_tokens for r in ok)
        counts = np.bincount([r.replica for r in ok]) if ok else np.zeros(1)
        return {"requests": len(self.records), "completed": len(ok), "rejected": len(self.records) - len(ok),
                "ttft": agg(r.ttft_s for r in ok), "tpot": agg(r.tpot_s for r in ok),
                "latency": agg(r.latency_s for r in ok),
                "cache_hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
                "per_replica": counts.tolist(), "sim_time_s": self.sim_time_s, "steps": self.steps}

    def tier_stats(self) -> dict:
        """Per SLO tier (in the tiers' order) and over all judged tiers: requests, finished
        (rejected and refused requests are not), met (finished within both targets, Tier.met),
        ttft_misses and tpot_misses (finished requests over each target; one may miss both),
        attainment (met / requests), goodput_rps and goodput_tps (met requests and their output
        tokens per second of `span_s`, from the first arrival to the last finish). A tier
        without targets (or best effort) counts its finished requests as met and stays out of
        "all": goodput is what met a target someone set."""
        finished = [r for r in self.records if not r.error]
        start = min((r.arrival_s for r in self.records), default=0.0)
        span = max((r.finish_s for r in finished), default=start) - start
        per = lambda n: n / span if span > 0 else 0.0  # noqa: E731 - a rate over the span

        def block(tier: Tier | None, rs: list[RequestRecord]) -> dict:
            done = [r for r in rs if not r.error]
            ttft = [r for r in done if tier is not None and tier.judged and r.ttft_s > tier.ttft_s]
            tpot = [r for r in done if tier is not None and tier.judged and r.tpot_s > tier.tpot_s]
            met = [r for r in done if tier is None or not tier.judged or tier.met(r.ttft_s, r.tpot_s)]
            return {"requests": len(rs), "finished": len(done), "met": len(met), "ttft_misses": len(ttft),
                    "tpot_misses": len(tpot), "attainment": len(met) / len(rs) if rs else math.nan,
                    "goodput_rps": per(len(met)), "goodput_tps": per(sum(r.output_tokens for r in met))}

        tiers = {t.name: block(t, [r for r in self.records if r.tier == t.name]) for t in self.tiers}
        judged = [t for t in self.tiers if t.judged]
        total = {k: sum(tiers[t.name][k] for t in judged)
                 for k in ("requests", "finished", "met", "ttft_misses", "tpot_misses", "goodput_rps", "goodput_tps")}
        total["attainment"] = total["met"] / total["requests"] if total["requests"] else math.nan
        return {"span_s": span, "tiers": tiers, "all": total}


class _Replica:
    def __init__(self, index: int, cfg: ReplicaConfig, router: Router, speculation=None, policy=None):
        if cfg.priority_groups:
            policy = PriorityGroups()
        drafter, max_spec, budget = speculation() if speculation is not None else (None, 0, None)
        self.sched = Scheduler(CacheConfig(page_size=cfg.page_size, num_pages=cfg.num_pages),
                               SchedulerConfig(max_num_batched_tokens=cfg.max_num_batched_tokens,
                                               max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len),
                               cfg.num_pages, policy, drafter, max_spec, budget)
        if hasattr(policy, "bind"):
            policy.bind(self.sched)
        self.evictions = self.sched.kv.eviction_log()
        self.busy = False
        self.plan = None
        self.step_s = 0.0  # the cost model's time of the plan's own step
        self.ends: list[float] = []  # end times of the steps the current event covers (> 1: fast-forward)
        self.gen = 0  # bumps when the current event is replaced; stale events are skipped
        self.reqs: dict[str, tuple[Request, RouteRequest, RequestRecord]] = {}


class Simulator:
    """fast_forward: a replica whose every running request is decoding, with nothing waiting,
    runs the stretch up to its next finish as one event (truncated at the step in progress if
    a request arrives there meanwhile); records equal step-by-step simulation (tested)."""

    def __init__(self, router: Router, num_replicas: int, cost: CostModel, replica: ReplicaConfig = ReplicaConfig(),
                 fast_forward: bool = True, speculation=None, tiers: tuple[Tier, ...] = (), policy=None):
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
        None: FCFS within tiers (or ReplicaConfig.priority_groups)."""
        if policy is not None and replica.priority_groups:
            raise ValueError("give either policy= or ReplicaConfig(priority_groups=True), not both")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names {names} must be distinct")
        self.router, self.cost, self.cfg, self.tiers = router, cost, replica, tuple(tiers)
        self._tier_rank = {t.name: (rank, t) for rank, t in enumerate(self.tiers)}
        self.now = 0.0  # simulation time, what a policy's clock reads
        clock = lambda: self.now  # noqa: E731
        self.replicas = [_Replica(i, replica, router, speculation, policy(clock) if policy is not None else None)
                         for i in range(num_replicas)]
        per_step = any(hasattr(rep.sched.policy, hook) for rep in self.replicas
                       for hook in ("on_schedule", "observe_step"))
        self.fast_forward = fast_forward and speculation is None and not per_step
        self._outputs: dict[int, tuple[int, ...]] = {}
        self._params: dict[int, SamplingParams] = {}

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

    def _sampling(self, max_tokens: int) -> SamplingParams:
        p = self._params.get(max_tokens)
        if p is None:
            p = self._params[max_tokens] = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return p

    def run(self, items: list[WorkItem]) -> SimResult:
        if any(isinstance(it.prompt, str) for it in items):
            raise ValueError("the simulator needs token-id prompts (text has no token count without a tokenizer)")
        tiers = [self._tier(i, it.tier) for i, it in enumerate(items)]
        events: list = []
        seq = 0
        for i, it in enumerate(items):
            events.append((it.arrival_s, seq, _ARRIVAL, i))
            seq += 1
        heapq.heapify(events)
        records: list[RequestRecord] = [None] * len(items)
        steps, now = 0, 0.0
        cfg = self.cfg
        while events:
            now, _, kind, data = heapq.heappop(events)
            self.now = now
            if kind == _ARRIVAL:
                it = items[data]
                n = len(it.prompt)
                priority, tier = tiers[data]
                name = tier.name if tier is not None else ""
                rreq = RouteRequest(str(data), tuple(it.prompt), it.max_tokens)
                if n + it.max_tokens > min(cfg.max_model_len, cfg.capacity_tokens):
                    records[data] = RequestRecord(data, -1, now, n, error="prompt + max_tokens exceeds the replica",
                                                  tier=name)
                    continue
                r = self.router.route(rreq, now)
                rec = records[data] = RequestRecord(data, r, now, n, tier=name)
                rep = self.replicas[r]
                req = Request(rreq.request_id, list(it.prompt), self._sampling(it.max_tokens), 0, now, data,
                              priority=priority, tier=tier)
                try:
                    rep.sched.admit(req)
                except AdmissionRefused as e:
                    rec.error = f"refused: {e}"
                    self.router.on_finish(r, rreq, now)
                    continue
                if it.output:
                    self._outputs[data] = it.output
                rep.reqs[req.request_id] = (req, rreq, rec)
                rep.sched.add(req)
                if not rep.busy:
                    seq = self._start(r, now, events, seq)
                elif len(rep.ends) > 1:  # stop the fast-forward after the step in progress
                    k = next(j for j, end in enumerate(rep.ends) if end >= now) + 1
                    if k < len(rep.ends):
                        del rep.ends[k:]
                        rep.gen += 1
                        heapq.heappush(events, (rep.ends[-1], seq, _STEP_DONE, (r, rep.gen)))
                        seq += 1
            else:
                r, gen = data
                rep = self.replicas[r]
                if gen != rep.gen:
                    continue  # replaced by a truncated fast-forward
                steps += len(rep.ends)
                self._finish_step(r, now)
                seq = self._start(r, now, events, seq)
        return SimResult(records, now, steps, self.tiers)

    def _start(self, r: int, now: float, events, seq: int) -> int:
        rep = self.replicas[r]
        plan = rep.sched.schedule(drafts=rep.sched.wants_drafts())
        if rep.evictions:  # scheduling is where the cache evicts; report as a replica would
            for tokens, keep in rep.evictions.drain():
                self.router.on_evict(r, tokens, keep)
        if not plan.seqs:
            rep.busy, rep.plan = False, None
            return seq
        dt = self.cost.step_time((len(s.token_ids), s.start_pos) for s in plan.seqs)
        rep.busy, rep.plan, rep.ends, rep.step_s = True, plan, [now + dt], dt
        if self.fast_forward:
            self._plan_stretch(rep, dt)
        rep.gen += 1
        heapq.heappush(events, (rep.ends[-1], seq, _STEP_DONE, (r, rep.gen)))
        return seq + 1

    def _plan_stretch(self, rep: _Replica, dt: float) -> None:
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

    def _truth(self, index: int, position: int) -> int:
        """The token the model writes at output position `position` of request `index`."""
        out = self._outputs.get(index, ())
        return out[position] if position < len(out) else 1_000_000_000 + index * 100_000 + position

    def _sampled(self, seq, req: Request, index: int) -> list[int]:
        """A step's sampled rows for a sequence, as the engine's sampler gives them: the true
        next token, and with a draft the true token at each draft position's output index
        (Scheduler.update verifies the draft against them)."""
        at = len(req.output_ids)
        if not seq.num_draft:
            return [self._truth(index, at)]
        k = seq.num_draft
        depths = Draft(tuple(seq.token_ids[-k:]), tuple(seq.draft_parents or range(-1, k - 1))).depths()
        return [self._truth(index, at)] + [self._truth(index, at + d) for d in depths]

    def _finish_step(self, r: int, now: float) -> None:
        rep = self.replicas[r]
        sched = rep.sched
        extra = len(rep.ends) - 1  # fast-forwarded steps after the plan's own
        plan = rep.plan
        reqs = [rep.reqs[s.request_id][0] for s in plan.seqs]
        sampled = [self._sampled(s, req, rep.reqs[s.request_id][2].index) for s, req in zip(plan.seqs, reqs)]

        def fast_forward(req, token, reason):
            """The fast-forwarded decode tokens join before the finish rules apply (length only:
            the simulator has no EOS)."""
            if not extra or reason:
                return reason
            ok = sched.extend_decode(req, list(range(token + 1, token + 1 + extra)))
            assert ok, "fast-forward pages were checked free"
            return sched.finish_reason(req)

        settled = sched.update(plan, reqs, sampled, finish_hook=fast_forward)
        if not extra:  # (a policy or budget that listens runs without fast-forward)
            sched.observe_step(plan.num_tokens, rep.step_s, sum(len(s.tokens) for s in settled),
                               any(s.num_draft for s in plan.seqs))
        finished = False
        for done in settled:
            req, request_id = done.req, plan.seqs[done.index].request_id
            _, rreq, rec = rep.reqs[request_id]
            if req.first_token_time is None:
                req.first_token_time = rec.first_token_s = now
                rec.cached_tokens = req.num_cached_prompt_tokens
                self.router.on_first_token(r, rreq, now, now - rec.arrival_s)
            if done.finish_reason:
                req.finish_time = now
                rec.finish_s, rec.output_tokens, rec.preemptions = now, len(req.output_ids), req.num_preemptions
                if rec.index in self._outputs and not self.fast_forward:
                    rec.output_ids = tuple(req.output_ids)
                del rep.reqs[request_id]
                self.router.on_finish(r, rreq, now)
                finished = True
        if finished:  # (finishes fall on the same steps with or without fast-forward)
            self.router.on_load(r, ReplicaLoad(len(sched.waiting), len(sched.running), self.cfg.num_pages,
                                               sched.kv.num_free, sched.kv.num_cached,
                                               self.cfg.page_size, len(rep.reqs)), now)
