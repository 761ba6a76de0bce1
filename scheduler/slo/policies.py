"""Scheduling policies for tiered SLOs (jinfer.config.Tier): two baselines and SloAware.

All three plug into jinfer's Scheduler as its SchedulingPolicy, in the engine, the server and
the simulator alike (the simulator hands them its clock).

FirstCome: arrival order, tiers ignored, running requests first (what a plain FCFS server does).
StrictPriority: the higher tier (lower `Request.priority`, the tier's rank) always first, in one
    order over running and waiting requests, preempting a lower tier's running request when a
    higher one is short of KV pages; arrival order within a tier.
SloAware: deadlines, risk, importance and demotion, read once per step (`on_schedule`):

  deadline  a request without its first token: arrival + tier.ttft_s (its TTFT target);
            a decoding one: first_token_time + tier.tpot_s * (tokens after the first + 1),
            the time its next token must come for the mean TPOT to stay on target.
  service   the time it still needs to reach that token: for r uncomputed tokens (1 for a
            decode), ceil(r / max_num_batched_tokens) steps of the typical observed step time
            plus token_s * (r - 1), token_s from the step-time model t = step_s + token_s *
            tokens fit over the observed steps (`observe_step`).
  slack     deadline - now - service.  At risk: slack < risk_steps * typical step time.
  order     (0) at risk: larger tier weight first, then earliest deadline;
            (1) on track: earliest deadline first;
            (2) best effort (tiers without targets, best-effort tiers, demoted requests):
                arrival order.
            Running and waiting requests share the order (`interleave`), so the step's token
            budget and sequence slots go to at-risk requests first, by importance.
  preempt   an at-risk request short of KV pages preempts (recompute) the lowest-ranked running
            request when that one is best effort or of a lower tier (`may_preempt`).
  demote    a request that can no longer meet its SLO is best effort from then on, so it does
            not starve the others: its TTFT deadline passed before its first token, or its
            first token came late, or even one step per remaining token up to max_tokens would
            leave the mean TPOT above target:
                (now - first_token_time + (max_tokens - outputs) * step_s) / (max_tokens - 1) > tpot.
  admit     (admission=True; off by default) a new request of a judged tier is refused when the
            prefill ahead of it (waiting requests ranked before it, plus its own prompt), as
            steps of the typical time plus token_s per token, cannot finish within its TTFT.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time

from jinfer.request import Request, Status


class FirstCome:
    """Arrival order; tiers ignored."""

    def priority(self, req: Request):
        return req.arrival_index


class StrictPriority:
    """Tier rank first (Request.priority), then arrival; preemptive across tiers."""

    interleave = True

    def priority(self, req: Request):
        return (req.priority, req.arrival_index)

    def may_preempt(self, req: Request, victim: Request) -> bool:
        return victim.priority > req.priority


@dataclasses.dataclass
class _State:
    demoted: bool = False
    key: tuple = ()  # its priority key, as computed in step `key_step`
    key_step: int = -1


class SloAware:
    """See the module docstring. clock: the time base of Request.arrival_time and
    first_token_time (time.monotonic in the engine; the simulator passes its own)."""

    interleave = True

    def __init__(self, clock=time.monotonic, risk_steps: float = 2.0, admission: bool = False,
                 step_s: float = 0.0, token_s: float = 0.0, decay: float = 0.95):
        """step_s, token_s: the step-time model before any step is observed (0: none yet);
        decay: weight of the past in the running fit (per observed step)."""
        if risk_steps < 0:
            raise ValueError(f"risk_steps={risk_steps} must be >= 0")
        if not 0 <= decay < 1:
            raise ValueError(f"decay={decay} must be in [0, 1)")
        self.clock, self.risk_steps, self.admission, self.decay = clock, risk_steps, admission, decay
        self.step_s, self.token_s = step_s, token_s
        self.typical_s = step_s  # decayed mean of the observed step times
        self._sums = [0.0] * 5  # decayed sums of 1, n, n^2, t, n*t over observed steps
        self.now = clock()
        self._step = 0  # bumps in on_schedule: a request's key is computed once per step
        self.budget = 0  # tokens per step (the bound scheduler's max_num_batched_tokens)
        self.demotions: collections.Counter = collections.Counter()  # tier name -> requests demoted
        self.refusals: collections.Counter = collections.Counter()  # tier name -> admissions refused

    def bind(self, scheduler) -> "SloAware":
        self.budget = scheduler.cfg.max_num_batched_tokens
        return self

    # -- the step-time model -----------------------------------------------------------------

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """Refits t = step_s + token_s * tokens over the observed steps (exponentially decayed)."""
        d, n, t = self.decay, float(num_tokens), float(seconds)
        self._sums = [d * s + x for s, x in zip(self._sums, (1.0, n, n * n, t, n * t))]
        w, sn, snn, st, snt = self._sums
        self.typical_s = st / w
        var = w * snn - sn * sn
        if var > 1e-9 * max(1.0, w * snn):
            slope = (w * snt - sn * st) / var
            self.token_s = max(0.0, slope)
            self.step_s = max(0.0, (st - self.token_s * sn) / w)
        else:  # every step the same size so far: all of it per step
            self.step_s, self.token_s = st / w, 0.0

    def step_time(self, tokens: int) -> float:
        return self.step_s + self.token_s * tokens

    # -- per request -------------------------------------------------------------------------

    def _state(self, req: Request) -> _State:
        if req.policy_state is None:
            req.policy_state = _State()
        return req.policy_state

    def _judged(self, req: Request) -> bool:
        return req.tier is not None and req.tier.judged and not self._state(req).demoted

    def deadline(self, req: Request) -> float:
        tier = req.tier
        if req.first_token_time is None:
            return req.arrival_time + tier.ttft_s
        return req.first_token_time + tier.tpot_s * len(req.output_ids)

    def service(self, req: Request) -> float:
        """Time it needs to its next token: a step per budget's worth of its uncomputed tokens
        (at least one), at the typical step time, plus their share of the per-token cost."""
        left = max(1, req.num_tokens - req.num_computed_tokens)
        return math.ceil(left / max(1, self.budget or left)) * self.typical_s + self.token_s * (left - 1)

    def slack(self, req: Request) -> float:
        return self.deadline(req) - self.now - self.service(req)

    def at_risk(self, req: Request) -> bool:
        return self._judged(req) and self.slack(req) < self.risk_steps * self.typical_s

    def _missed(self, req: Request) -> bool:
        """Whether req can no longer meet its SLO (the demotion rule)."""
        tier, now = req.tier, self.now
        if req.first_token_time is None:
            return now > req.arrival_time + tier.ttft_s
        if req.first_token_time - req.arrival_time > tier.ttft_s:
            return True
        limit = req.params.max_tokens
        if limit < 2 or math.isinf(tier.tpot_s):
            return False
        left = max(0, limit - len(req.output_ids))
        return (now - req.first_token_time + left * self.step_s) / (limit - 1) > tier.tpot_s

    def on_schedule(self, scheduler) -> None:
        self.now = self.clock()
        self._step += 1
        if not self.budget:
            self.bind(scheduler)
        for req in scheduler.running + scheduler.waiting:
            if self._judged(req) and req.status is not Status.FINISHED and self._missed(req):
                self._state(req).demoted = True
                self.demotions[req.tier.name] += 1

    def priority(self, req: Request):
        """The request's key, computed once per step (a step sorts and compares it several
        times; its order within the step stays fixed)."""
        state = self._state(req)
        if state.key_step != self._step:
            state.key, state.key_step = self._key(req), self._step
        return state.key

    def _key(self, req: Request):
        if not self._judged(req):
            return (2, 0.0, 0.0, req.arrival_index)
        deadline = self.deadline(req)
        if self.slack(req) < self.risk_steps * self.typical_s:
            return (0, -req.tier.weight, deadline, req.arrival_index)
        return (1, 0.0, deadline, req.arrival_index)

    def may_preempt(self, req: Request, victim: Request) -> bool:
        if not self.at_risk(req):
            return False
        return not self._judged(victim) or victim.priority > req.priority

    def is_demoted(self, req: Request) -> bool:
        return req.policy_state is not None and req.policy_state.demoted

    # -- admission -----------------------------------------------------------------------------

    def admit(self, req: Request, scheduler) -> str | None:
        if not self.admission or req.tier is None or not req.tier.judged or math.isinf(req.tier.ttft_s):
            return None
        if self.typical_s == 0.0 and self.token_s == 0.0:
            return None  # no step measured yet: nothing to judge by
        self.now = self.clock()
        if not self.budget:
            self.bind(scheduler)
        mine = self._key(req)
        ahead = sum(w.num_tokens - w.num_computed_tokens for w in scheduler.waiting
                    if self.priority(w) < mine)
        tokens = ahead + len(req.prompt_ids)
        wait = math.ceil(tokens / max(1, self.budget)) * self.typical_s + self.token_s * tokens
        if wait <= req.tier.ttft_s:
            return None
        self.refusals[req.tier.name] += 1
        return (f"tier {req.tier.name!r} cannot meet its TTFT target of {req.tier.ttft_s * 1e3:.0f} ms: "
                f"about {wait * 1e3:.0f} ms of prefill ({tokens} tokens) is queued ahead of its first token")
