"""Tiered-SLO scheduling (scheduler/slo/policies.py) on hand-built cases: at the Scheduler with a fake
clock (queue jumping, preemption, demotion, admission), and in the Engine (greedy outputs
unchanged by the policy, preempted requests finishing with identical tokens, refusals that
leave nothing behind)."""

import math

import numpy as np
import pytest

from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig, Tier
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.request import Request, Status
from jinfer.sampling_params import SamplingParams
from jinfer.scheduling import Scheduler
from jinfer.scheduling_policy import FCFS, AdmissionRefused
from jinfer.tokenizer import Tokenizer
from scheduler.slo.policies import FirstCome, SloAware, StrictPriority

INTERACTIVE = Tier("interactive", ttft_s=0.5, tpot_s=0.05, weight=4)
BATCH = Tier("batch", ttft_s=20.0, tpot_s=1.0, weight=1)
BACKGROUND = Tier("background", best_effort=True)
RANK = {"interactive": 0, "batch": 1, "background": 2}
STEP_S = 0.02


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Driver:
    """A synchronous stand-in for the engine around a Scheduler: every step's tokens are read
    at once, the clock moves STEP_S per step and the policy hears each step's time."""

    def __init__(self, policy, *, pages=64, page_size=4, budget=32, seqs=4):
        self.clock = getattr(policy, "clock", None) or Clock()
        self.s = Scheduler(CacheConfig(page_size=page_size, num_pages=pages),
                           SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=seqs, max_model_len=256),
                           pages, policy)
        if hasattr(policy, "bind"):
            policy.bind(self.s)
        self.n = 0
        self.reqs: dict[str, Request] = {}

    def add(self, tier: Tier, prompt_len=8, max_tokens=40) -> Request:
        rid = f"{tier.name}{self.n}"
        prompt = [(self.n * 37 + i) % 250 + 1 for i in range(prompt_len)]  # distinct: no shared pages
        req = Request(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                          ignore_eos=True),
                      0, self.clock(), self.n, priority=RANK.get(tier.name, 0), tier=tier)
        self.n += 1
        self.s.admit(req)
        self.s.add(req)
        self.reqs[rid] = req
        return req

    def step(self):
        plan = self.s.schedule()
        reqs = [self.reqs[q.request_id] for q in plan.seqs]
        self.clock.t += STEP_S
        self.s.observe_step(plan.num_tokens, STEP_S)
        for done in self.s.update(plan, reqs, [7] * len(reqs)):
            if done.req.first_token_time is None:
                done.req.first_token_time = self.clock()
        return plan

    def planned(self, plan) -> set[str]:
        return {q.request_id for q in plan.seqs}


def _slo(**kw):
    return SloAware(clock=Clock(), **kw)


def test_tier_specs_parse_and_judge():
    t = Tier.parse("interactive:500:50:4")
    assert (t.ttft_s, t.tpot_s, t.weight, t.best_effort) == (0.5, 0.05, 4.0, False) and t.judged
    assert Tier.parse("bg:best_effort").best_effort and not Tier.parse("bg:best_effort").judged
    assert not Tier.parse("plain").judged and Tier.parse("x:inf:100").judged
    assert t.met(0.5, 0.05) and not t.met(0.51, 0.01) and not t.met(0.1, 0.06) and t.met(0.1, math.nan)
    for bad, msg in [("a:1", "must look like"), ("a:x:1", "numbers"), ("a:1:2:0", "weight=0.0"),
                     ("a:-1:2", "ttft_s=-0.001"), ("a:1:2:best_effort", "no targets")]:
        with pytest.raises(ValueError, match=msg):
            Tier.parse(bad)


@pytest.mark.parametrize("policy, jumps", [(FirstCome(), "never"), (FCFS(), "never"), (_slo(), "at risk"),
                                           (StrictPriority(), "at once")])
def test_interactive_request_takes_a_seat_from_a_full_batch_queue(policy, jumps):
    # Four batch requests decode in all four sequence slots; an interactive request arrives.
    # Running-first policies keep it waiting for a slot. Strict priority preempts a batch
    # request for it at once; the SLO-aware policy does so once it is at risk of missing its
    # TTFT (a fresh request with slack to spare waits: preemption costs a recompute).
    d = Driver(policy, seqs=4, pages=128)  # room for every request's pages: seats are what is short
    batch = [d.add(BATCH, max_tokens=60) for _ in range(4)]
    for _ in range(3):
        d.step()
    assert all(r.status is Status.RUNNING for r in batch)
    inter = d.add(INTERACTIVE, max_tokens=5)
    plan = d.step()
    assert (inter.request_id in d.planned(plan)) is (jumps == "at once")
    assert bool(plan.preempted) is (jumps == "at once")
    if jumps == "at risk":
        d.clock.t = inter.arrival_time + INTERACTIVE.ttft_s - 2 * STEP_S
        plan = d.step()
        assert inter.request_id in d.planned(plan) and len(plan.preempted) == 1
    while any(r.status is not Status.FINISHED for r in d.reqs.values()):
        d.step()
    if jumps != "never":
        assert inter.first_token_time - inter.arrival_time <= INTERACTIVE.ttft_s
        assert sum(r.num_preemptions for r in batch) == 1  # the victim recomputed and finished
    assert all(len(r.output_ids) == r.params.max_tokens for r in d.reqs.values())
    assert d.s.kv.num_free + d.s.kv.num_cached == 128


def test_requests_sitting_out_keep_their_seats_within_max_num_seqs():
    policy = _slo()
    d = Driver(policy, seqs=3, budget=8)  # budget < prompt: admissions cannot all proceed at once
    for _ in range(3):
        d.add(BATCH, max_tokens=30)
    for _ in range(4):
        d.step()
    for _ in range(5):
        d.add(INTERACTIVE, max_tokens=3)  # fresh, on track: earlier deadlines than the batch ones
    for _ in range(6):
        d.step()
        assert len(d.s.running) <= 3


def test_edf_orders_on_track_requests_and_weight_orders_at_risk_ones():
    policy = _slo(step_s=STEP_S)
    d = Driver(policy)
    batch, inter = d.add(BATCH), d.add(INTERACTIVE)
    policy.on_schedule(d.s)
    assert policy.priority(inter) < policy.priority(batch)  # earlier deadline (0.5 s vs 20 s)
    assert not policy.at_risk(inter) and not policy.at_risk(batch)
    d.clock.t = 19.99  # batch's TTFT deadline is near; the interactive one has passed (demoted)
    policy.on_schedule(d.s)
    assert policy.at_risk(batch) and policy.is_demoted(inter)
    assert policy.priority(batch) < policy.priority(inter)
    # Two at-risk requests: the heavier tier first, whatever the deadlines.
    heavy = Tier("heavy", ttft_s=30.0, tpot_s=1.0, weight=8)
    late = Request("h", [1, 2], SamplingParams(max_tokens=4), 0, d.clock(), 99, priority=0, tier=heavy)
    d.clock.t = late.arrival_time + 29.999
    batch.arrival_time = d.clock.t - 19.999
    policy.on_schedule(d.s)
    assert policy.at_risk(late) and policy.at_risk(batch)
    assert policy.priority(late) < policy.priority(batch)


def test_at_risk_interactive_request_preempts_batch_which_then_finishes():
    # 12 pages of 4 tokens: two batch requests (8-token prompts, 16 outputs) take 10 of them
    # after 12 steps; a 12-token interactive prompt cannot get its pages without a preemption.
    policy = _slo()
    d = Driver(policy, pages=12, budget=32, seqs=4)
    batch = [d.add(BATCH, max_tokens=16) for _ in range(2)]
    for _ in range(12):
        d.step()
    assert d.s.kv.num_free < 3
    inter = d.add(INTERACTIVE, prompt_len=12, max_tokens=4)
    d.clock.t += INTERACTIVE.ttft_s - 2 * STEP_S  # waited: at risk (slack < 2 steps), not yet missed
    plan = d.step()
    assert inter.request_id in d.planned(plan)
    assert plan.preempted and set(plan.preempted) <= {b.request_id for b in batch}
    victim = d.reqs[plan.preempted[0]]
    assert victim.num_preemptions == 1 and victim.status is Status.WAITING
    assert not policy.is_demoted(inter)
    while any(r.status is not Status.FINISHED for r in d.reqs.values()):
        d.step()
    assert [len(b.output_ids) for b in batch] == [16, 16] and len(inter.output_ids) == 4
    assert d.s.kv.num_free + d.s.kv.num_cached == 12


def test_an_on_track_request_does_not_preempt():
    policy = _slo()
    d = Driver(policy, pages=12, budget=32, seqs=4)
    for _ in range(2):
        d.add(BATCH, max_tokens=16)
    for _ in range(12):
        d.step()
    inter = d.add(INTERACTIVE, prompt_len=12, max_tokens=4)
    plan = d.step()  # fresh: 0.5 s of slack, the step model says a step is 20 ms
    assert not plan.preempted and inter.status is Status.WAITING


def test_strict_priority_preempts_lower_tiers_only():
    d = Driver(StrictPriority(), pages=12)
    low = [d.add(BATCH, max_tokens=16) for _ in range(2)]
    for _ in range(12):
        d.step()
    plan = d.step()
    assert not plan.preempted
    d.add(INTERACTIVE, prompt_len=12, max_tokens=4)
    plan = d.step()
    assert plan.preempted and set(plan.preempted) <= {r.request_id for r in low}


def test_requests_past_their_ttft_deadline_are_demoted_to_best_effort():
    policy = _slo()
    d = Driver(policy, seqs=1)
    first = d.add(BATCH, max_tokens=30)
    d.step()
    late = d.add(INTERACTIVE, max_tokens=4)
    fresh_bg = d.add(BACKGROUND, max_tokens=4)
    d.clock.t += 1.0  # past the interactive TTFT deadline, before it ever ran
    policy.on_schedule(d.s)
    assert policy.is_demoted(late) and policy.demotions == {"interactive": 1}
    assert not policy.is_demoted(first)
    # Demoted = best effort: arrival order with the background tier, after every judged request.
    assert policy.priority(first) < policy.priority(late) < policy.priority(fresh_bg)
    # ... and it never preempts.
    assert not policy.may_preempt(late, first)
    policy.on_schedule(d.s)
    assert policy.demotions == {"interactive": 1}  # counted once


def test_a_request_whose_mean_tpot_cannot_recover_is_demoted():
    policy = _slo(step_s=STEP_S)
    d = Driver(policy)
    req = d.add(INTERACTIVE, max_tokens=11)
    for _ in range(3):
        d.step()
    assert req.first_token_time is not None and not policy.is_demoted(req)
    # 10 gaps may take 0.5 s in all; 0.45 s have passed and 8 tokens remain at >= 20 ms each.
    d.clock.t = req.first_token_time + 0.45
    policy.on_schedule(d.s)
    assert policy.is_demoted(req)


def test_admission_refuses_what_the_queue_cannot_serve_in_time():
    policy = _slo(admission=True)
    d = Driver(policy, budget=32)
    assert d.add(INTERACTIVE) is not None  # no step measured yet: admitted
    for _ in range(2):
        d.step()  # 20 ms steps
    for _ in range(10):
        d.add(BATCH, prompt_len=200, max_tokens=1)  # 2000 prompt tokens queued
    tight = Tier("tight", ttft_s=0.1, tpot_s=1.0, weight=8)
    waiting = list(d.s.waiting)
    # Ranked before the batch prompts (earlier deadline): only its own 20 tokens lie ahead.
    assert d.add(tight, prompt_len=20)
    # A 4000-token prompt needs 125 steps of 32 tokens: 2.5 s > 0.1 s.
    with pytest.raises(AdmissionRefused, match=r"tier 'tight' cannot meet its TTFT target of 100 ms"):
        d.add(tight, prompt_len=4000)
    assert len(d.s.waiting) == len(waiting) + 1 and policy.refusals == {"tight": 1}
    # Tiers without a TTFT target, and the policy with admission off, admit anything.
    assert d.add(BACKGROUND, prompt_len=4000)
    policy.admission = False
    assert d.add(tight, prompt_len=4000)


def test_slo_policy_keeps_pages_consistent_under_random_load():
    rng = np.random.default_rng(0)
    policy = _slo(risk_steps=3.0)
    d = Driver(policy, pages=16, budget=16, seqs=3)
    tiers = [INTERACTIVE, BATCH, BACKGROUND]
    for i in range(300):
        if rng.random() < 0.3:
            d.add(tiers[int(rng.integers(0, 3))], prompt_len=int(rng.integers(1, 20)),
                  max_tokens=int(rng.integers(1, 20)))
        d.step()
        refs = [d.s.pool.refcount(p) for p in range(16)]
        held = [0] * 16
        for r in d.s.running + d.s.waiting:
            for p in r.pages:
                held[p] += 1
        for node in d.s.prefix_cache.nodes():
            for p in node.pages:
                held[p] += 1
        assert refs == held
    while any(r.status is not Status.FINISHED for r in d.reqs.values()):
        d.step()
    assert all(len(r.output_ids) == r.params.max_tokens for r in d.reqs.values())
    assert d.s.kv.num_free + d.s.kv.num_cached == 16
    assert sum(r.num_preemptions for r in d.reqs.values()) > 0  # the load did press on the pool


# -- in the engine ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(hf_checkpoints):
    path = hf_checkpoints["llama3"]
    # 20 pages of 4 tokens: five 20-40 token requests cannot all fit: some are preempted.
    return Engine(load_hf_model(path), Tokenizer.from_dir(path), CacheConfig(page_size=4, num_pages=20),
                  SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=96),
                  options=EngineOptions(async_scheduling=True))


def _run(engine, policy, jobs):
    """jobs: (prompt, tier); the batch ones are added first and get a head start of 3 steps.
    Returns the outputs in job order and the jobs preempted (indices, one per preemption)."""
    engine.scheduler.policy = policy
    if hasattr(policy, "bind"):
        policy.bind(engine.scheduler)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    preempted = []
    orig = engine.scheduler.preempt
    engine.scheduler.preempt = lambda req: (preempted.append(req.request_id), orig(req))
    try:
        ids, final = {}, {}
        for i, (prompt, tier) in enumerate(jobs):
            if tier.name == "batch":
                ids[engine.add_request(prompt, params, priority=RANK[tier.name], tier=tier)] = i
        for _ in range(3):
            for out in engine.step():
                final[out.request_id] = out
        for i, (prompt, tier) in enumerate(jobs):
            if tier.name != "batch":
                ids[engine.add_request(prompt, params, priority=RANK[tier.name], tier=tier)] = i
        while engine.has_unfinished():
            for out in engine.step():
                final[out.request_id] = out
        for _ in range(2):
            engine.step()
    finally:
        del engine.scheduler.preempt
        engine.scheduler.policy = FCFS()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.scheduler.kv.num_free + engine.scheduler.kv.num_cached == 20
    return [final[rid].token_ids for rid in sorted(ids, key=ids.get)], [ids[r] for r in preempted]


def test_greedy_outputs_unchanged_by_the_policy_and_preempted_batch_finishes_identically(engine):
    rng = np.random.default_rng(3)
    jobs = [(rng.integers(0, 256, 24).tolist(), BATCH), (rng.integers(0, 256, 20).tolist(), BATCH),
            (rng.integers(0, 256, 6).tolist(), INTERACTIVE), (rng.integers(0, 256, 9).tolist(), INTERACTIVE),
            (rng.integers(0, 256, 5).tolist(), BACKGROUND)]
    alone = [engine.generate([p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].token_ids
             for p, _ in jobs]
    fcfs, _ = _run(engine, FCFS(), jobs)
    # Every judged request always at risk (risk_steps huge, targets far): interactive requests
    # preempt running batch ones whenever pages run short, deterministically.
    far = {t.name: Tier(t.name, ttft_s=1e6, tpot_s=1e6, weight=t.weight) for t in (INTERACTIVE, BATCH, BACKGROUND)
           if t.judged}
    slo, preempted = _run(engine, SloAware(risk_steps=1e12, step_s=0.01), [(p, far.get(t.name, t)) for p, t in jobs])
    assert fcfs == alone and slo == alone
    assert preempted, "the pool was meant to force preemptions"
    assert "interactive" not in {jobs[i][1].name for i in preempted}  # they preempted the others


def test_admission_refusal_in_the_engine_leaves_nothing_behind(engine):
    policy = SloAware(admission=True, step_s=10.0)  # a step model that cannot meet 0.5 s
    engine.scheduler.policy = policy.bind(engine.scheduler)
    try:
        with pytest.raises(AdmissionRefused, match="tier 'interactive'"):
            engine.add_request([1, 2, 3], SamplingParams(max_tokens=4), request_id="r1",
                               priority=0, tier=INTERACTIVE)
        assert not engine.has_unfinished() and not engine.is_unfinished("r1")
        rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=4), request_id="r1", priority=1, tier=BATCH)
        while engine.has_unfinished():
            engine.step()
        engine.step()
        assert rid == "r1"
    finally:
        engine.scheduler.policy = FCFS()
