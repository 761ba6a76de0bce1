"""The interface a scheduling policy implements (who goes first, who may be preempted, who is
admitted), the default one (FCFS) and the refusal an admission check raises. Policies live in
scheduler/slo/; jinfer.scheduling.Scheduler calls them."""

from __future__ import annotations

from typing import Protocol

from jinfer.request import Request


class SchedulingPolicy(Protocol):
    """Orders requests; the scheduler admits and keeps them in this order.

    Only `priority` is required. A policy may also have (the Scheduler looks them up):
      - `interleave` (bool attribute, default False): running and waiting requests share one
        order for the step's token budget and sequence slots, so a waiting request may go
        before a running one (which then sits out the step, keeping its pages); without it
        running requests always go first.
      - `may_preempt(req, victim) -> bool`: `req` cannot get KV pages; may it preempt the
        running request `victim` (the lowest-priority one, recompute-style)? Default: no
        (a waiting request then waits; a running one still preempts as always).
      - `on_schedule(scheduler)`: called at the start of every `schedule()` (read the clock
        once, revise per-request state).
      - `admit(req, scheduler) -> str | None`: called by `Scheduler.admit` before a new
        request is queued: a reason to refuse it (AdmissionRefused), or None.
      - `observe_step(num_tokens, seconds)`: the engine or simulator reports each step's
        size and duration.
    And one the Scheduler never calls:
      - `bind(scheduler) -> policy`: whoever builds a Scheduler with this policy calls it once
        the Scheduler exists (entrypoints.build, jinfer.instances.Instances, the simulators), and
        `Engine.reset` calls it again with the fresh Scheduler, so a policy that reads the
        scheduler's state (its prefix cache, its token budget) follows it. Returns the policy.
    """

    def priority(self, req: Request):
        """Smaller runs first and is preempted last (a key compared with <)."""


class AdmissionRefused(RuntimeError):
    """The scheduling policy refuses a new request (e.g. its TTFT target cannot be met given
    the queue): a server answers RESOURCE_EXHAUSTED with the message."""


class FCFS:
    def priority(self, req: Request):
        return (req.priority, req.arrival_index)
