"""Routing policies compared in the discrete-event simulator on the Preble-like workloads.

For a workload (scheduler/routing/preble_workloads.py) and a request rate, every router serves the same
requests on N simulated replicas whose step times come from a cost model. Rates are multiples
of a per-workload base rate (preble_workloads.base_rate). `RoutingRuns` runs them and keeps the
simulator's wall time; tools/simulate_routing.py and notebooks/prefix_routing share it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

from scheduler.cost_model import CostModel, analytic_7b_h100
from scheduler.routing import preble_workloads as pw
from scheduler.routing.policies import ROUTERS, E2Options, make_router
from scheduler.simulation.simulator import ReplicaConfig, SimResult, Simulator
from scheduler.simulation.workloads import WorkItem

E2_ABLATION = ("E2 alone", "+ rebalance & replication", "+ P/D balance", "+ priority groups")
"""E2's parts added one at a time: the columns of RoutingRuns.ablation."""


@dataclasses.dataclass(frozen=True)
class RoutingSetup:
    replicas: int = 4
    num_requests: int = 2000
    """Requests per run."""
    zipf_a: float = 0.0
    """Key-portion popularity: 0 even, else Zipf(a)."""
    scale: float = 1.0
    """Every length divided by this."""
    num_pages: int = 25_000
    """KV pages per replica."""
    page_size: int = 16
    seed: int = 0

    @property
    def replica(self) -> ReplicaConfig:
        return ReplicaConfig(page_size=self.page_size, num_pages=self.num_pages)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Every router on one workload at one rate."""

    workload: str
    rate_factor: float
    rate: float  # requests/s
    results: dict[str, SimResult]  # router name -> its run

    def stats(self, router: str) -> dict:
        return self.results[router].stats()


class RoutingRuns:
    """Simulations on one setup and cost model, counting the requests simulated and the wall
    time spent."""

    def __init__(self, setup: RoutingSetup = RoutingSetup(), cost: CostModel | None = None):
        self.setup = setup
        self.cost = cost or analytic_7b_h100()
        self.requests = 0
        self.wall_s = 0.0

    def base_rate(self, workload: str) -> float:
        return pw.base_rate(pw.SPECS[workload], self.cost, self.setup.replicas, self.setup.scale)

    def items(self, workload: str, rate: float) -> list[WorkItem]:
        s = self.setup
        return pw.generate(workload, s.num_requests, rate=rate, zipf_a=s.zipf_a, scale=s.scale,
                           max_len=s.replica.max_model_len, seed=s.seed)

    def simulate(self, router: str, items: list[WorkItem], options: E2Options = E2Options(),
                 replica: ReplicaConfig | None = None) -> SimResult:
        s = self.setup
        t0 = time.perf_counter()
        res = Simulator(make_router(router, s.replicas, self.cost, s.replica.capacity_tokens, options), s.replicas,
                        self.cost, replica or s.replica).run(items)
        self.wall_s += time.perf_counter() - t0
        self.requests += len(items)
        return res

    def compare(self, workload: str, rate_factor: float, routers: Sequence[str] = ROUTERS) -> Comparison:
        rate = self.base_rate(workload) * rate_factor
        items = self.items(workload, rate)
        return Comparison(workload, rate_factor, rate, {r: self.simulate(r, items) for r in routers})

    def ablation(self, workload: str, rate_factor: float) -> list[dict]:
        """E2 with its parts added one by one (E2_ABLATION); each run's stats()."""
        items = self.items(workload, self.base_rate(workload) * rate_factor)
        s = self.setup
        grouped = ReplicaConfig(page_size=s.page_size, num_pages=s.num_pages, priority_groups=True)
        variants = [(E2Options(rebalance=False, replicate=False, pd_balance=False), None),
                    (E2Options(pd_balance=False), None), (E2Options(), None), (E2Options(), grouped)]
        return [self.simulate("preble-e2", items, opt, rcfg).stats() for opt, rcfg in variants]


@dataclasses.dataclass(frozen=True)
class RoutingStudy:
    """notebooks/prefix_routing at one size."""

    setup: RoutingSetup
    rate_factors: tuple[float, ...]
    workloads: tuple[str, ...] = tuple(pw.SPECS)


ROUTING_STUDY = {
    "small": RoutingStudy(RoutingSetup(num_requests=100), rate_factors=(1.0,)),
    "full": RoutingStudy(RoutingSetup(num_requests=1000), rate_factors=(0.5, 1.0)),
}


def run_routing_study(study: RoutingStudy, cost: CostModel | None = None,
                      log: Callable[[str], None] = lambda _: None) -> tuple[list[Comparison], RoutingRuns]:
    """Every router on every workload at every rate factor of `study`."""
    runs = RoutingRuns(study.setup, cost)
    out = []
    for name in study.workloads:
        for f in study.rate_factors:
            out.append(runs.compare(name, f))
            log(f"{name} x{f:g}: " + ", ".join(f"{r} {out[-1].stats(r)['latency']['avg']:.2f} s" for r in ROUTERS))
    return out, runs


def findings(comparisons: Sequence[Comparison]) -> str:
    """What the runs say, as markdown bullets computed from them: per workload at its highest
    rate, the best router by average latency, E2 against round-robin, and the hit rates."""
    top = {}
    for c in comparisons:
        if c.workload not in top or c.rate_factor > top[c.workload].rate_factor:
            top[c.workload] = c
    out = []
    for name, c in top.items():
        avg = {r: c.stats(r)["latency"]["avg"] for r in c.results}
        p99 = {r: c.stats(r)["latency"]["p99"] for r in c.results}
        hit = {r: c.stats(r)["cache_hit_rate"] for r in c.results}
        best = min(avg, key=avg.get)
        e2 = "preble-e2"
        out.append(
            f"- {name} (rate x{c.rate_factor:g}, {c.rate:.1f} req/s): lowest average latency with {best} "
            f"({avg[best]:.2f} s); round-robin / E2 latency {avg['round-robin'] / avg[e2]:.2f} average and "
            f"{p99['round-robin'] / p99[e2]:.2f} p99 (above 1: E2 is faster). Prefix-cache hit rate: "
            + ", ".join(f"{r} {hit[r]:.0%}" for r in c.results) + ".")
    return "\n".join(out)
