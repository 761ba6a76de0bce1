"""A tiered workload replayed live through an InstanceGroup (jinfer.instances), in wall-clock
time on this host's devices: a static partition or the adaptive-TP controller, judged as the
simulator judges (scheduler.simulation.records.SimResult.tier_stats).

One host thread drives the group: requests are added when their arrival time has passed (token-
id prompts, greedy, EOS ignored, the tier and its rank as priority, as the server gives them),
then the group steps every busy instance once (and, once per control window, lets the
controller regroup). TTFT runs from the scheduled arrival, as a client would measure it, so
time a request waits for the host counts against it. A request the instance's policy refuses at
admission (SloAware(admission=True)) is a miss.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

from jinfer.config import Tier
from jinfer.instances import InstanceGroup
from jinfer.sampling_params import SamplingParams
from jinfer.scheduling_policy import AdmissionRefused
from jinfer.records import RequestRecord
from scheduler.simulation.records import SimResult
from scheduler.simulation.workloads import WorkItem


@dataclasses.dataclass
class LiveRun:
    result: SimResult  # records in item order; tier_stats() judges them
    tokens: list[tuple[int, ...]]  # output token ids per item
    wall_s: float
    start: float  # the clock's reading at time 0 of the run


def replay(group: InstanceGroup, items: Sequence[WorkItem], tiers: Sequence[Tier], *,
           clock=time.monotonic) -> LiveRun:
    """Serves `items` through `group` in wall-clock time (module docstring)."""
    rank = {t.name: (k, t) for k, t in enumerate(tiers)}
    unknown = sorted({it.tier for it in items} - set(rank))
    if unknown:
        raise ValueError(f"items name tiers {unknown}; known: {list(rank)}")
    records = [RequestRecord(k, -1, it.arrival_s, len(it.prompt), tier=it.tier) for k, it in enumerate(items)]
    tokens: list[tuple[int, ...]] = [()] * len(items)
    order = sorted(range(len(items)), key=lambda k: items[k].arrival_s)
    at, start = 0, clock()
    while at < len(order) or group.has_unfinished():
        now = clock() - start
        while at < len(order) and items[order[at]].arrival_s <= now:
            k = order[at]
            it = items[k]
            prio, tier = rank[it.tier]
            params = SamplingParams(temperature=0, max_tokens=it.max_tokens, ignore_eos=True)
            try:
                group.add_request(list(it.prompt), params, request_id=f"r{k}", priority=prio, tier=tier)
            except AdmissionRefused as e:  # the instance's policy refused it: a miss, as the server counts it
                records[k].error = f"refused: {e}"
            at += 1
        if not group.has_unfinished():
            time.sleep(max(0.0, items[order[at]].arrival_s - (clock() - start)))
            continue
        for out in group.step():
            k = int(out.request_id[1:])
            rec = records[k]
            if out.first_token_time is not None and math.isnan(rec.first_token_s):
                rec.first_token_s = out.first_token_time - start
            if out.finished:
                rec.finish_s = out.finish_time - start
                rec.output_tokens = len(out.token_ids)
                tokens[k] = tuple(out.token_ids)
    wall = clock() - start
    return LiveRun(SimResult(records, wall, 0, tuple(tiers)), tokens, wall, start)


def reconfiguration_summary(group: InstanceGroup) -> dict:
    """count, seconds (summed), weight bytes moved / minimum / full reload, KV bytes moved and
    requests migrated over the group's regroups."""
    rs = group.reconfigurations
    return {"count": len(rs), "seconds": sum(r.seconds for r in rs),
            "weights_moved": sum(r.weights_moved for r in rs), "weights_minimum": sum(r.weights_minimum for r in rs),
            "weights_full_reload": sum(r.weights_full_reload for r in rs), "kv_moved": sum(r.kv_moved for r in rs),
            "requests_migrated": sum(r.requests_migrated for r in rs)}


def measure_regroups(group: InstanceGroup, cycle: Sequence[Sequence[int]], prompts: Sequence[Sequence[int]],
                     steps_between: int = 3, max_tokens: int = 64) -> list:
    """Regroups `group` through every partition of `cycle` (instance sizes each) while greedy
    requests for `prompts` run, stepping the group `steps_between` times before each regroup;
    the requests are aborted at the end. Returns the group's Reconfiguration records of these
    regroups: the measured pauses a simulator's ReconfigModel is fitted to
    (scheduler.simulation.nitsum_sim.ReconfigModel.fit)."""
    first = len(group.reconfigurations)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = [group.add_request(list(p), params) for p in prompts]
    for sizes in cycle:
        for _ in range(steps_between):
            group.step()
        group.regroup(list(sizes))
    for rid in ids:
        group.abort(rid)
    while any(e.has_unfinished() for e in group.engines):  # outputs held by a regroup, aborts settled
        for engine in group.engines:
            engine.step()
    return group.reconfigurations[first:]
