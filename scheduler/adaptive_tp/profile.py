"""What the adaptive-TP controller decides from, and the load it is judged on: SLO-safe rate
profiles per (tier, TP degree), found by simulation, and tiered workloads whose mix and load
shift over time.

Workloads. A tier's requests have a `TierShape` (mean prompt and output tokens, uniform within
+-spread); a `Phase` is a stretch of time with a Poisson arrival rate per tier. Arrivals of
each (phase, tier) are one seeded stream: unit-rate exponential gaps scaled by 1 / rate, so the
same seed at a higher rate gives the same requests, earlier, and then more of them (what makes
the profile search below monotone in practice). Prompts are token ids (no prefix sharing).

Profiles. `profile_rates` finds, per tier and TP degree, the highest Poisson rate at which one
instance of that degree, serving only that tier in the simulator (scheduler/simulation/nitsum_sim.py with
the degree's cost model and the given scheduling policy), keeps the tier's attainment (requests
meeting both TTFT and TPOT / requests) at or above `attainment`: doubling up from a guess
until attainment drops below it, then bisecting the bracket down to `rel_tol`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import numpy as np

from jinfer.config import Tier
from scheduler.adaptive_tp.nitsum import InstancePlan, Partition, Profile
from scheduler.cost_model import CostModel
from scheduler.simulation.nitsum_sim import AdaptiveSimulator, StaticControl
from scheduler.simulation.simulator import ReplicaConfig
from scheduler.simulation.workloads import WorkItem


@dataclasses.dataclass(frozen=True)
class TierShape:
    """Lengths of one tier's requests: means in tokens, each uniform within +-spread of it."""

    prompt: int
    output: int
    spread: float = 0.5

    def __post_init__(self):
        if self.prompt < 1 or self.output < 1:
            raise ValueError(f"prompt={self.prompt} and output={self.output} must be >= 1 token")
        if not 0 <= self.spread < 1:
            raise ValueError(f"spread={self.spread} must be in [0, 1)")

    @classmethod
    def parse(cls, spec: str) -> tuple[str, "TierShape"]:
        """'agent:6144:64:0.33' -> ("agent", TierShape(6144, 64, 0.33)) (tier:prompt:output[:spread])."""
        parts = spec.split(":")
        try:
            if len(parts) not in (3, 4) or not parts[0]:
                raise ValueError("wrong number of fields")
            return parts[0], cls(int(parts[1]), int(parts[2]), *(float(x) for x in parts[3:]))
        except ValueError as e:
            raise ValueError(f"shape {spec!r} must look like tier:prompt:output[:spread] ({e})") from None

    def longest(self) -> int:
        """Prompt + output tokens of the longest request it draws."""
        return round(self.prompt * (1 + self.spread)) + round(self.output * (1 + self.spread))


@dataclasses.dataclass(frozen=True)
class Phase:
    """duration_s seconds of Poisson arrivals at rates[tier] requests/s per tier."""

    duration_s: float
    rates: Mapping[str, float]
    name: str = ""

    def __post_init__(self):
        if not self.duration_s > 0:
            raise ValueError(f"duration_s={self.duration_s} must be > 0")
        bad = {t: r for t, r in self.rates.items() if not r >= 0}
        if bad:
            raise ValueError(f"phase {self.name!r}: rates {bad} must be >= 0 requests/s")

    @classmethod
    def parse(cls, spec: str) -> "Phase":
        """'agent=60:interactive:2,agent:6' -> Phase(60, {interactive: 2, agent: 6}, 'agent')
        (name=seconds:tier:rate,tier:rate...; the name is optional)."""
        name, _, rest = spec.rpartition("=")
        head, _, body = rest.partition(":")
        try:
            rates = {}
            for part in filter(None, body.split(",")):
                tier, _, rate = part.partition(":")
                rates[tier.strip()] = float(rate)
            return cls(float(head), rates, name.strip())
        except ValueError as e:
            raise ValueError(f"phase {spec!r} must look like name=seconds:tier:rate,tier:rate ({e})") from None


def _ids(rng, n: int, vocab: tuple[int, int]) -> tuple[int, ...]:
    return tuple(int(x) for x in rng.integers(vocab[0], vocab[1], size=n))


def poisson_tier(tier: str, shape: TierShape, rate: float, duration_s: float, *, vocab: tuple[int, int],
                 seed: int = 0, start_s: float = 0.0) -> list[WorkItem]:
    """One tier's requests arriving at `rate` req/s (Poisson) in [start_s, start_s + duration_s).
    The same seed gives the same requests in the same order at any rate (module docstring)."""
    if rate <= 0:
        return []
    rng = np.random.default_rng(seed)
    items, t = [], 0.0
    lo = lambda mean: max(1, round(mean * (1 - shape.spread)))  # noqa: E731
    hi = lambda mean: max(1, round(mean * (1 + shape.spread)))  # noqa: E731
    while True:
        t += rng.exponential(1.0)  # in units of the mean gap
        if t / rate >= duration_s:
            return items
        n = int(rng.integers(lo(shape.prompt), hi(shape.prompt) + 1))
        out = int(rng.integers(lo(shape.output), hi(shape.output) + 1))
        items.append(WorkItem(start_s + t / rate, _ids(rng, n, vocab), out, tier))


def shifting_workload(phases: Sequence[Phase], shapes: Mapping[str, TierShape], *, vocab: tuple[int, int],
                      seed: int = 0) -> list[WorkItem]:
    """The phases one after another, each tier's arrivals within a phase Poisson at its rate;
    ordered by arrival. ValueError for a tier without a shape."""
    missing = sorted({t for p in phases for t, r in p.rates.items() if r > 0} - set(shapes))
    if missing:
        raise ValueError(f"tiers {missing} have no TierShape; have {sorted(shapes)}")
    items, start = [], 0.0
    for k, phase in enumerate(phases):
        for j, (tier, rate) in enumerate(sorted(phase.rates.items())):
            items += poisson_tier(tier, shapes[tier], rate, phase.duration_s, vocab=vocab,
                                  seed=seed * 1_000_003 + 1009 * k + j, start_s=start)
        start += phase.duration_s
    return sorted(items, key=lambda it: it.arrival_s)


def average_rates(phases: Sequence[Phase]) -> dict[str, float]:
    """Each tier's arrival rate averaged over the whole workload (req/s)."""
    total = sum(p.duration_s for p in phases)
    tiers = sorted({t for p in phases for t in p.rates})
    return {t: sum(p.rates.get(t, 0.0) * p.duration_s for p in phases) / total for t in tiers}


# -- profiles ------------------------------------------------------------------------------------

def bisect_rate(ok: Callable[[float], bool], guess: float, *, rel_tol: float = 0.05, max_rate: float = 1e4) -> float:
    """The highest rate r with ok(r) (assumed true below some threshold, false above), within
    rel_tol of the threshold: doubles (or halves) from `guess` to bracket it, then bisects.
    0.0 when even guess / 64 fails; max_rate when it never fails below that."""
    if not guess > 0 or not 0 < rel_tol < 1:
        raise ValueError(f"guess={guess} must be > 0 and rel_tol={rel_tol} in (0, 1)")
    lo, hi = 0.0, guess
    if ok(guess):
        lo, hi = guess, 2 * guess
        while ok(hi):
            lo, hi = hi, 2 * hi
            if hi > max_rate:
                return max_rate
    else:
        for _ in range(6):
            hi /= 2
            if ok(hi):
                lo, hi = hi, 2 * hi
                break
        else:
            return 0.0
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def attainment_at(cost: CostModel, tier: Tier, shape: TierShape, rate: float, *, requests: int,
                  replica: ReplicaConfig, policy: Callable | None, vocab: tuple[int, int], seed: int = 0,
                  ttft_multiple: float = 6.0) -> float:
    """Attainment of `tier` served alone by one instance with this cost model: the tier's seeded
    stream at `rate` req/s (Poisson) for requests / rate seconds, or ttft_multiple times the
    TTFT target if longer (a backlog must have time to break a loose target), every request
    run to its finish. A higher rate gives the same requests closer together, then more."""
    duration = max(requests / rate, ttft_multiple * tier.ttft_s if math.isfinite(tier.ttft_s) else 0.0)
    items = poisson_tier(tier.name, shape, rate, duration, vocab=vocab, seed=seed)
    if not items:
        return 1.0
    control = StaticControl(Partition((InstancePlan(1, tier.name),)), window_s=items[-1].arrival_s + 1)
    sim = AdaptiveSimulator(control, {1: cost}, (tier,), replica, policy=policy, num_devices=1)
    return sim.run(items).tier_stats()["tiers"][tier.name]["attainment"]


def safe_rate(cost: CostModel, tier: Tier, shape: TierShape, guess: float | None = None, *, requests: int,
              replica: ReplicaConfig, policy: Callable | None, attainment: float, rel_tol: float,
              vocab: tuple[int, int], seed: int = 0) -> float:
    """The SLO-safe rate of `tier` on one instance with this cost model (module docstring).
    guess: where the search starts; None: half the rate the instance could serve with every
    decode in a batch of 32."""
    if guess is None:
        step = cost.step_time([(1, shape.prompt + shape.output // 2)] * 32) / 32
        guess = 0.5 / (cost.prefill_time(shape.prompt) + shape.output * step)

    def ok(rate):
        return attainment_at(cost, tier, shape, rate, requests=requests, replica=replica, policy=policy,
                             vocab=vocab, seed=seed) >= attainment

    return bisect_rate(ok, guess, rel_tol=rel_tol)


def _safe_rate(args):  # a picklable call for a process pool
    return safe_rate(*args[0], **args[1])


def profile_rates(costs: Mapping[int, CostModel], tiers: Sequence[Tier], shapes: Mapping[str, TierShape], *,
                  replica: ReplicaConfig = ReplicaConfig(), policy: Callable | None = None,
                  attainment: float = 0.9, requests: int = 1000, rel_tol: float = 0.05,
                  vocab: tuple[int, int] = (0, 32000), seed: int = 0, notes: str = "",
                  progress: Callable[[str], None] | None = None, pool_map: Callable | None = None) -> Profile:
    """The SLO-safe rate of every (judged tier, TP degree in costs) (module docstring), as the
    controller's Profile. requests: how many requests each trial rate serves; policy:
    callable(clock) -> SchedulingPolicy inside the instance (e.g. SloAware), None: FCFS.
    progress: called with one line per (tier, degree). pool_map: a map over a process pool
    (e.g. multiprocessing.Pool.imap) to search the (tier, degree) pairs at once; None: one
    after another, each degree starting from the previous degree's rate."""
    if not 0 < attainment <= 1:
        raise ValueError(f"attainment={attainment} must be in (0, 1]")
    if requests < 1:
        raise ValueError(f"requests={requests} must be >= 1")
    check_fits(shapes, replica)
    judged = [t for t in tiers if t.judged]
    missing = sorted(t.name for t in judged if t.name not in shapes)
    if missing:
        raise ValueError(f"tiers {missing} have no TierShape; have {sorted(shapes)}")
    kw = dict(requests=requests, replica=replica, policy=policy, attainment=attainment, rel_tol=rel_tol,
              vocab=vocab, seed=seed)
    pairs = [(t, tp) for t in judged for tp in sorted(costs)]
    rates: dict[str, dict[int, float]] = {t.name: {} for t in judged}
    if pool_map is not None:
        found = pool_map(_safe_rate, [((costs[tp], t, shapes[t.name]), kw) for t, tp in pairs])
    else:
        found = (safe_rate(costs[tp], t, shapes[t.name], rates[t.name].get(prev) or None, **kw)
                 for (t, tp), prev in zip(pairs, [None] + [tp for _, tp in pairs[:-1]]))
    for (t, tp), rate in zip(pairs, found):
        rates[t.name][tp] = rate
        if progress is not None:
            progress(f"{t.name} tp{tp}: {rate:.3g} req/s")
    return Profile(rates, attainment, notes)


def profile_table(profile: Profile) -> str:
    """Markdown: SLO-safe req/s per tier (rows) and TP degree, and per device."""
    degrees = profile.degrees
    lines = ["| tier | " + " | ".join(f"tp{d}" for d in degrees) + " | " +
             " | ".join(f"tp{d} per device" for d in degrees) + " | best per device |",
             "|---|" + "---:|" * (2 * len(degrees) + 1)]
    for tier, per in profile.rates.items():
        eff = {d: per.get(d, 0.0) / d for d in degrees}
        best = max(degrees, key=lambda d: (eff[d], -d))
        lines.append(f"| {tier} | " + " | ".join(f"{per.get(d, 0.0):.2f}" for d in degrees) + " | " +
                     " | ".join(f"{eff[d]:.2f}" for d in degrees) + f" | tp{best} |")
    return "\n".join(lines)


def check_fits(shapes: Mapping[str, TierShape], replica: ReplicaConfig) -> None:
    """ValueError naming a tier whose longest request does not fit max_model_len."""
    for name, shape in shapes.items():
        if shape.longest() > min(replica.max_model_len, replica.capacity_tokens):
            raise ValueError(f"tier {name!r}: requests up to {shape.longest()} tokens exceed max_model_len="
                             f"{replica.max_model_len}")
