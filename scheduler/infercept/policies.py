"""What to do with a paused request's K/V while its tool runs (jinfer.pausing.PausePolicy):
InferCept's least-waste choice and the baselines it is measured against.

InferCept (Abhyankar et al., ICML'24) counts the GPU memory x time each choice wastes for a
paused request with C context tokens of M bytes each:
  preserve:        T_INT * C * M                       (held idle for the pause T_INT)
  discard:         T_fwd(C) * C * M / 2                (recomputing it, one chunk at a time,
                   + n * T_fwd(C/n) * C_other * M       while the other running requests'
                                                        C_other tokens of K/V wait on it)
  swap:            hidden when within the step's swap budget: the N tokens whose
                   T_swap(N) = T_fwd(batch) (the copy overlaps the step)
Every step it sorts the paused requests by min(preserve, discard), largest first, swaps them
out in that order while the budget lasts (its answer lists them in that order, which the
mechanism follows; the last one it starts may not fit: the mechanism swaps it in chunks, the
rest in the next steps' budgets first), and preserves or discards each of the rest by whichever
wastes less. T_INT is the time paused so far (now - t_call), or an oracle's
remaining time when one is given (say which a result used).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Mapping, Sequence

from jinfer.pausing import DISCARD, PRESERVE, SWAP, PauseView
from jinfer.request import Request
from scheduler.cost_model import CostModel


class PreserveAll:
    """Keeps every paused request's K/V on the device (pinned until resume)."""

    def decide(self, paused: Sequence[Request], view: PauseView) -> Mapping[str, str]:
        return {r.request_id: PRESERVE for r in paused}


class DiscardAll:
    """Drops every paused request's K/V into the prefix cache (recomputed on resume, where
    evicted); the request keeps its place in the queue (InferCept's "improved discard")."""

    def decide(self, paused: Sequence[Request], view: PauseView) -> Mapping[str, str]:
        return {r.request_id: DISCARD for r in paused}


class RequeueDiscard(DiscardAll):
    """vLLM-style: the request ends at its tool call and the continuation comes back as a new
    request, at the back of the queue; its KV is only what the prefix cache still holds."""

    requeue = True


class SwapAll:
    """Copies every paused request's K/V to the host tier at once, whatever it costs."""

    def decide(self, paused: Sequence[Request], view: PauseView) -> Mapping[str, str]:
        return {r.request_id: SWAP for r in paused}


class PinTTL:
    """Continuum-style: keep a paused request's K/V for ttl_s seconds, then discard it."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.clock = ttl_s, clock

    def decide(self, paused: Sequence[Request], view: PauseView) -> Mapping[str, str]:
        now = self.clock()
        return {r.request_id: PRESERVE if now - r.pause.since < self.ttl_s else DISCARD for r in paused}


@dataclasses.dataclass(frozen=True)
class PauseProfile:
    """What the waste model needs of the engine: forward time by tokens, host copy time by
    tokens, K/V bytes per token (one device's shard), the saturation point S (tokens per step
    past which a step's time grows with its tokens: a discarded context is recomputed in
    chunks of S)."""

    fwd_s: Callable[[int], float]
    swap_s: Callable[[int], float]
    kv_bytes_per_token: float
    saturation_tokens: int
    swap_overlaps: bool = True
    """A copy engine moves swaps beside the compute (a GPU's DMA): swaps within the budget the
    step hides are free. False (a CPU host: the copy runs on the step's own cores): a swap
    wastes 2 * T_swap(C) * C_batch * M, InferCept's WasteSwap, and competes with the others."""

    @classmethod
    def from_cost_model(cls, cost: CostModel, kv_bytes_per_token: float, host_bandwidth: float,
                        saturation_tokens: int = 512) -> "PauseProfile":
        """T_fwd from a step cost model (a prefill alone in a step), T_swap from a host link's
        bandwidth (bytes/s; an assumption to write down beside any result)."""
        return cls(lambda n: cost.prefill_time(n), lambda n: n * kv_bytes_per_token / host_bandwidth,
                   kv_bytes_per_token, saturation_tokens)

    def swap_budget_tokens(self, step_s: float) -> int:
        """N with T_swap(N) = T_fwd(batch) = step_s (the last step's time): what one step hides."""
        per_token = self.swap_s(1)
        return int(step_s / per_token) if per_token > 0 else 1 << 62


class InferCept:
    """Least waste per paused request, every step (module docstring). remaining: an oracle
    (request id -> seconds until its tool returns) in place of the time paused so far."""

    def __init__(self, profile: PauseProfile, clock: Callable[[], float] = time.monotonic,
                 remaining: Callable[[str], float] | None = None):
        self.profile, self.clock, self.remaining = profile, clock, remaining
        self.decisions = {PRESERVE: 0, DISCARD: 0, SWAP: 0}  # counts over the run

    def wastes(self, req: Request, view: PauseView, now: float) -> tuple[float, float]:
        """(preserve, discard) waste of req now, in byte-seconds."""
        p, c, m = self.profile, req.num_computed_tokens, self.profile.kv_bytes_per_token
        t_int = self.remaining(req.request_id) if self.remaining is not None else now - req.pause.since
        n = max(1, math.ceil(c / p.saturation_tokens))
        preserve = t_int * c * m
        discard = p.fwd_s(c) * c * m / 2 + n * p.fwd_s(math.ceil(c / n)) * view.running_tokens * m
        return preserve, discard

    def swap_waste(self, req: Request, view: PauseView) -> float:
        """A swap's waste where nothing hides it: out and back in while the batch waits."""
        p, c = self.profile, req.num_computed_tokens
        return 2 * p.swap_s(c) * (view.running_tokens + c) * p.kv_bytes_per_token

    def swap_budget_tokens(self, view: PauseView) -> int | None:
        """What one step's swaps may move: the step hides T_swap(N) = T_fwd(batch); None where
        nothing hides a swap (each is charged its own waste instead, and moves whole)."""
        return self.profile.swap_budget_tokens(view.last_step_s) if self.profile.swap_overlaps else None

    def decide(self, paused: Sequence[Request], view: PauseView) -> Mapping[str, str]:
        now = self.clock()
        scored = sorted(((*self.wastes(r, view, now), r) for r in paused), key=lambda w: -min(w[0], w[1]))
        budget = 0
        if self.profile.swap_overlaps:  # (the mechanism's budget left after the swaps under way)
            budget = view.swap_budget if view.swap_budget is not None else self.swap_budget_tokens(view)
        out = {}
        for preserve, discard, req in scored:
            if budget >= view.page_size:  # a page at least: it starts, in chunks if it does not fit
                pages = -(-req.num_computed_tokens // view.page_size)  # copies move whole pages
                budget -= min(pages * view.page_size, budget // view.page_size * view.page_size)
                out[req.request_id] = SWAP
            else:
                wastes = {PRESERVE: preserve, DISCARD: discard}
                if not self.profile.swap_overlaps:
                    wastes[SWAP] = self.swap_waste(req, view)
                out[req.request_id] = min(wastes, key=wastes.get)
            self.decisions[out[req.request_id]] += 1
        return out


POLICIES = {"preserve": PreserveAll, "discard": DiscardAll, "vllm-discard": RequeueDiscard, "swap": SwapAll,
            "pin-ttl": PinTTL, "infercept": InferCept}
"""Name -> class, for tools' flags."""
