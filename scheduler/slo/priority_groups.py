"""Preble's local queue: requests in priority groups by prefix-cache hit ratio.

A request's hit ratio (cached prompt tokens / prompt tokens, probed when the policy first sees
it) puts it in one of `num_groups` groups; group g gets weight g + 1, and requests are ordered
by stride scheduling (a request's tag = max(its group's pass, the virtual time) + 1/weight),
so over any stretch group g is admitted about (g + 1)/(h + 1) times as often as group h:
cache-hit-heavy requests go first without starving the misses. SLO tier (`Request.priority`)
still comes before all of this. Plugs into jinfer's Scheduler as its SchedulingPolicy.
"""

from __future__ import annotations

from jinfer.request import Request, Status


class PriorityGroups:
    def __init__(self, num_groups: int = 10):
        if num_groups < 1:
            raise ValueError(f"num_groups={num_groups} must be >= 1")
        self.num_groups = num_groups
        self._pass = [0.0] * num_groups
        self._virtual = 0.0
        self.prefix_cache = None

    def bind(self, scheduler) -> "PriorityGroups":
        """Reads hit ratios from this scheduler's prefix cache (none bound: every request is in
        group 0, i.e. FCFS)."""
        self.prefix_cache = scheduler.prefix_cache
        return self

    def group(self, req: Request) -> int:
        if self.prefix_cache is None or not req.prompt_ids:
            return 0
        ratio = self.prefix_cache.peek(req.prompt_ids) / len(req.prompt_ids)
        return min(self.num_groups - 1, int(ratio * self.num_groups))

    def priority(self, req: Request):
        if req.policy_state is None:
            g = self.group(req)
            tag = max(self._pass[g], self._virtual) + 1.0 / (g + 1)
            self._pass[g] = tag
            req.policy_state = tag
        if req.status is Status.RUNNING and req.policy_state > self._virtual:
            self._virtual = req.policy_state  # admitted: virtual time moves on
        return (req.priority, req.policy_state, req.arrival_index)
