"""The simulation core: one simulated replica and one event queue, which the routing driver
(simulator.py: replicas behind a router) and the adaptive-TP driver (nitsum_sim.py: instances
a topology control regroups) both run.

A SimReplica is jinfer's own Scheduler (token budgets, paged KV pool, prefix cache with its
eviction, chunked prefill, preemption, speculation) with the device replaced by the cost
model's time for each plan, and the records of the requests it holds. It admits requests
(running its policy's admission check as the engine does), plans steps, and settles them with
the step's sampled rows, updating each record at its first token and its finish. No JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import time

from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.request import Request
from jinfer.sampling_params import SamplingParams
from jinfer.scheduling import Scheduler
from jinfer.scheduling_policy import AdmissionRefused
from jinfer.speculation import Draft
from scheduler.cost_model import CostModel
from scheduler.simulation.workloads import WorkItem
from jinfer.records import RequestRecord
from scheduler.slo.priority_groups import PriorityGroups


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
    swap_s_per_page: float = 0.0
    """Host link time to copy one KV page one way (a paused request's swap-out or swap-in);
    the copies overlap the step: a step with copies takes max(its compute, its copies)."""

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether a request can ever run here (its prompt and output within the model length
        and the pool)."""
        return prompt_tokens + max_tokens <= min(self.max_model_len, self.capacity_tokens)


MARKER, END = 2_147_483_000, 2_147_483_001
"""The tokens a simulated request with tool calls writes at a call (its intercept token) and
at the end of its last segment (a stop token)."""


@functools.lru_cache(maxsize=None)
def greedy(max_tokens: int, tools: bool = False) -> SamplingParams:
    """The sampling parameters of a simulated request: greedy, EOS ignored, max_tokens long;
    with tools, pausing at MARKER and stopping at END."""
    if tools:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, stop_token_ids=(END,),
                              intercept_token_ids=(MARKER,))
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def tool_tokens(item: WorkItem) -> int:
    """Every token a request with tool calls adds to its context: outputs of every segment and
    the tools' returns."""
    return item.max_tokens + sum(c.after_tokens + c.return_tokens for c in item.tool_calls)


class EventQueue:
    """Timed events, earliest first; events at the same time in the order they were pushed."""

    def __init__(self):
        self._heap: list = []
        self._seq = 0

    def push(self, t: float, kind: int, data) -> None:
        heapq.heappush(self._heap, (t, self._seq, kind, data))
        self._seq += 1

    def pop(self) -> tuple[float, int, object]:
        t, _, kind, data = heapq.heappop(self._heap)
        return t, kind, data

    def __bool__(self) -> bool:
        return bool(self._heap)


class SimReplica:
    """One replica (or TP instance): a Scheduler, its cost model, the step it runs and the
    requests it holds (request id -> (Request, RequestRecord, the driver's own handle)).

    speculation: () -> (drafter, max_spec_tokens, draft budget or None), as Simulator takes it.
    outputs: WorkItem index -> the tokens the model writes (verifies drafts; else placeholders
    unique to the request and position)."""

    def __init__(self, cfg: ReplicaConfig, cost: CostModel, policy=None, speculation=None,
                 outputs: dict[int, tuple[int, ...]] | None = None, pause_policy=None, clock=time.monotonic):
        if cfg.priority_groups:
            policy = PriorityGroups()
        drafter, max_spec, budget = speculation() if speculation is not None else (None, 0, None)
        self.sched = Scheduler(CacheConfig(page_size=cfg.page_size, num_pages=cfg.num_pages),
                               SchedulerConfig(max_num_batched_tokens=cfg.max_num_batched_tokens,
                                               max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len),
                               cfg.num_pages, policy, drafter, max_spec, budget, pause_policy, clock)
        self.tools: dict[int, WorkItem] = {}  # item index -> its item, for items with tool calls
        self.segment: dict[int, int] = {}  # item index -> its current segment (tool calls made)
        if hasattr(policy, "bind"):
            policy.bind(self.sched)
        self.cfg, self.cost = cfg, cost
        self.outputs = outputs if outputs is not None else {}
        self.busy = False
        self.plan = None
        self.step_s = 0.0  # the cost model's time of the plan's own step
        self.ends: list[float] = []  # end times of the steps the current event covers (> 1: fast-forward)
        self.gen = 0  # bumps when the current event is replaced; stale events are skipped
        self.paused_until = 0.0
        self.computed_tokens = 0  # tokens the replica's steps computed (fast-forwarded ones not counted)
        self.reqs: dict[str, tuple[Request, RequestRecord, object]] = {}

    def admit(self, req: Request, rec: RequestRecord, handle=None) -> bool:
        """Queues req (its record rec) after the policy's admission check; a refusal is
        written into rec.error and returns False."""
        try:
            self.sched.admit(req)
        except AdmissionRefused as e:
            rec.error = f"refused: {e}"
            return False
        self.reqs[req.request_id] = (req, rec, handle)
        self.sched.add(req)
        return True

    def start(self, now: float, drafts: bool = False) -> float | None:
        """Plans the next step; returns its cost-model time (None, and idle, when nothing runs)."""
        plan = self.sched.schedule(drafts=drafts)
        if not plan.seqs and not plan.swap_in:  # (a restore under way steps on with its copies alone)
            self.busy, self.plan = False, None
            return None
        dt = self.cost.step_time((len(s.token_ids), s.start_pos) for s in plan.seqs) if plan.seqs else 0.0
        if plan.swap_out or plan.swap_in:
            dt = max(dt, sum(len(p) for _, p in plan.swap_out + plan.swap_in) * self.cfg.swap_s_per_page)
        self.busy, self.plan, self.ends, self.step_s, self.drafting = True, plan, [now + dt], dt, drafts
        self.computed_tokens += plan.num_tokens
        self.gen += 1
        return dt

    def truth(self, index: int, position: int) -> int:
        """The token the model writes at output position `position` of request `index` (of its
        current segment, for a request with tool calls)."""
        item = self.tools.get(index)
        if item is not None:
            seg = self.segment.get(index, 0)
            calls = item.tool_calls
            if position == (calls[seg].after_tokens if seg < len(calls) else item.max_tokens) - 1:
                return MARKER if seg < len(calls) else END
        out = self.outputs.get(index, ())
        return out[position] if position < len(out) else 1_000_000_000 + index * 100_000 + position

    def sampled(self, seq, req: Request, index: int, repeats: int = 1) -> list[int]:
        """A step's sampled rows for a sequence, as the engine's sampler gives them: the true
        next token, and with a draft the true token at each draft position's output index
        (Scheduler.update verifies the draft against them); for a plan run `repeats` times,
        the true tokens of those steps."""
        at = len(req.output_ids)
        if repeats > 1:
            if index in self.outputs or index in self.tools:
                return [self.truth(index, at + j) for j in range(repeats)]
            first = self.truth(index, at)  # placeholders: consecutive numbers
            return list(range(first, first + repeats))
        if not seq.num_draft:
            return [self.truth(index, at)]
        k = seq.num_draft
        depths = Draft(tuple(seq.token_ids[-k:]), tuple(seq.draft_parents or range(-1, k - 1))).depths()
        return [self.truth(index, at)] + [self.truth(index, at + d) for d in depths]

    def resume(self, index: int, request_id: str) -> float:
        """Request `index` (id request_id) got its tool's output: resumed with that many
        placeholder tokens; returns the pause it took (for its record)."""
        item, seg = self.tools[index], self.segment.get(index, 0)
        call = item.tool_calls[seg]
        self.segment[index] = seg + 1
        ids = [1_500_000_000 + index * 1_000 + seg * 100 + k % 100 for k in range(call.return_tokens)]
        self.sched.resume(self.reqs[request_id][0], ids)
        return call.pause_s

    def settle(self, now: float, repeats: int = 1) -> list[tuple]:
        """Settles the step that ended at `now` (Scheduler.update with its sampled rows), or
        the stretch of `repeats` steps of one plan that did (a fast-forward), and reports a
        single step to the policy (observe_step; a fast-forwarded stretch's steps a listening
        policy never gets). Records first tokens and finishes; drops finished requests.
        Returns (Settled, record, handle, first_token) per sequence."""
        sched, plan = self.sched, self.plan
        held = [self.reqs[s.request_id] for s in plan.seqs]
        reqs = [h[0] for h in held]
        sampled = [self.sampled(s, h[0], h[1].index, repeats) for s, h in zip(plan.seqs, held)]
        settled = sched.update(plan, reqs, sampled, repeats=repeats)
        if repeats == 1 and plan.seqs:
            decoding = plan.num_decoding
            sched.observe_step(plan.num_tokens, self.step_s, sum(len(s.tokens) for s in settled),
                               any(s.num_draft for s in plan.seqs), num_decoding=decoding,
                               decode_only=decoding == len(plan.seqs), drafting=self.drafting,
                               pipelined=True)  # (a simulated step's time is its cost, as a pipeline period is)
        out = []
        for done in settled:
            req = done.req
            _, rec, handle = self.reqs[req.request_id]
            first = req.first_token_time is None
            if first:
                req.first_token_time = rec.first_token_s = now
                rec.cached_tokens = req.num_cached_prompt_tokens
            if done.paused:  # a tool call: this segment's tokens count, the next starts empty
                rec.output_tokens += len(req.output_ids)
                rec.tool_calls += 1
            if done.finish_reason:
                req.finish_time = rec.finish_s = now
                rec.output_tokens, rec.preemptions = rec.output_tokens + len(req.output_ids), req.num_preemptions
                del self.reqs[req.request_id]
            out.append((done, rec, handle, first))
        return out
