"""Nitsum: tensor parallelism as a runtime control for tiered load.

Every control window a controller observes each tier's arrivals (and how many of them were
served), and picks a partition of the devices into instances, each with a TP degree and the
tier it serves; `jinfer.instances.Instances.regroup` (live) or the simulator applies it while
requests run. This module holds the policy: the profiles it decides from, the greedy choice,
the hysteresis that keeps it from thrashing, and the routing of a request to an instance.

Profiles. `Profile.rate(tier, tp)` is the SLO-safe request rate of one instance of degree
`tp` serving only that tier: the highest Poisson arrival rate at which the tier's requests
still meet their TTFT and TPOT targets (attainment >= `Profile.attainment`), found offline
(`profile_rates`, by simulation with the cost model of each TP degree).

Choice (`Controller.plan`). The paper hands devices out greedily by goodput efficiency
(SLO-compliant req/s an option adds, capped by the tier's arrivals, per device) with a
starvation factor per tier. With 8 devices and degrees 1/2/4/8 the options are few (a few
hundred partitions x tier assignments), so the controller scores every one instead, by the
same quantity summed over tiers: sum_t weight_t * starvation_t * min(capacity_t, arrivals_t),
capacity_t = the profile rates of the tier's instances; starvation_t = arrivals / served over
the last windows (at least 1), so a tier the current partition starves weighs more. Ties go
to the partition whose worst-off tier has the most headroom (capacity / arrivals), then to
fewer instances. The greedy pass can strand a small tier that needs a high degree (it hands
the devices to a more efficient tier first); the exhaustive score cannot. With no demand at
all, every device is an instance of the smallest degree serving every tier.

Hysteresis (`Controller.decide`): a new partition replaces the current one only when
  - the same partition came out of `confirm` consecutive windows,
  - at least the dwell has passed since the last change: `min_dwell_s`, doubled for each
    change in a run of changes (each less than twice `flap_window_s` after the one before),
    up to `flap_window_s` (flap damping, as routers damp a flapping route: a controller that
    keeps switching between two partitions waits longer each time, then at least
    flap_window_s; a calm spell of twice that ends the run),
  - its objective (the weighted goodput `plan` maximises) beats the current one's by at least
    `hysteresis` (relative), and
  - the gain over `horizon_s` pays for the reconfiguration: (new - current) * horizon_s >
    current * reconfig_s(current, new), with reconfig_s the measured (or modelled) pause.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable, Mapping, Sequence

from jinfer.config import Tier


@dataclasses.dataclass(frozen=True)
class InstancePlan:
    """One instance of a partition: its TP degree and the tier it serves ("" = every tier)."""

    tp: int
    tier: str = ""


@dataclasses.dataclass(frozen=True)
class Partition:
    instances: tuple[InstancePlan, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(i.tp for i in self.instances)

    @property
    def num_devices(self) -> int:
        return sum(self.sizes)

    def serving(self, tier: str) -> list[int]:
        """Indices of the instances that serve `tier` (its own, then the shared ones)."""
        own = [k for k, i in enumerate(self.instances) if i.tier == tier]
        return own or [k for k, i in enumerate(self.instances) if not i.tier]

    def canonical(self) -> "Partition":
        """Largest instances first, then by tier: the order devices are handed out in, so two
        equal partitions compare equal and groups stay aligned."""
        return Partition(tuple(sorted(self.instances, key=lambda i: (-i.tp, i.tier))))

    def __str__(self) -> str:
        return " + ".join(f"tp{i.tp}:{i.tier or '*'}" for i in self.instances)

    @classmethod
    def parse(cls, spec: str) -> "Partition":
        """'tp4:interactive + tp2:batch + tp2:*' -> Partition (the __str__ form)."""
        out = []
        for part in spec.split("+"):
            part = part.strip()
            tp, _, tier = part.partition(":")
            if not tp.startswith("tp") or not tp[2:].isdigit() or int(tp[2:]) < 1:
                raise ValueError(f"instance {part!r} in {spec!r} must look like tp<degree>:<tier or *>")
            out.append(InstancePlan(int(tp[2:]), "" if tier in ("", "*") else tier))
        return cls(tuple(out))


class Profile:
    """SLO-safe request rates per (tier, TP degree), req/s per instance."""

    def __init__(self, rates: Mapping[str, Mapping[int, float]], attainment: float = 0.9, notes: str = ""):
        self.rates = {t: {int(tp): float(r) for tp, r in per.items()} for t, per in rates.items()}
        self.attainment, self.notes = attainment, notes
        for t, per in self.rates.items():
            for tp, r in per.items():
                if tp < 1 or not r >= 0:
                    raise ValueError(f"profile rate for tier {t!r} at tp={tp} is {r}: must be >= 0 with tp >= 1")

    def rate(self, tier: str, tp: int) -> float:
        return self.rates.get(tier, {}).get(tp, 0.0)

    @property
    def degrees(self) -> list[int]:
        return sorted({tp for per in self.rates.values() for tp in per})

    def to_dict(self) -> dict:
        return {"attainment": self.attainment, "notes": self.notes,
                "rates": {t: {str(tp): r for tp, r in per.items()} for t, per in self.rates.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        return cls(d["rates"], d.get("attainment", 0.9), d.get("notes", ""))


def capacity(partition: Partition, profile: Profile, demand: Mapping[str, float] | None = None,
             value: Callable[[str], float] = lambda tier: 1.0) -> dict[str, float]:
    """SLO-safe req/s each tier gets. A tier with instances of its own gets their profile rates.
    A tier without is served by the shared instances (as `route` sends it), which split their
    time among such tiers: each instance-second of degree d serves rate(tier, d) requests of one
    tier, handed out by value(tier) * rate(tier, d), highest first, each tier taking what its
    demand still needs (a greedy split, not always the best one; it ignores the interference of
    tiers batched together). demand None: shared instances count
    for nothing (no demand to split them by)."""
    out: dict[str, float] = collections.defaultdict(float)
    shared: collections.Counter = collections.Counter()  # degree -> instance-seconds per second
    for inst in partition.instances:
        if inst.tier:
            out[inst.tier] += profile.rate(inst.tier, inst.tp)
        else:
            shared[inst.tp] += 1
    need = {t: r for t, r in (demand or {}).items() if r > 0 and t not in out}
    options = sorted(((value(t) * profile.rate(t, d), t, d) for t in need for d in shared if profile.rate(t, d) > 0),
                     reverse=True)
    for _, t, d in options:
        use = min(shared[d], need[t] / profile.rate(t, d))
        if use > 0:
            shared[d] -= use
            need[t] -= use * profile.rate(t, d)
            out[t] += use * profile.rate(t, d)
    return dict(out)


def predicted_goodput(partition: Partition, profile: Profile, arrivals: Mapping[str, float]) -> float:
    """Sum over tiers of min(capacity, arrival rate): SLO-met req/s the partition can serve."""
    cap = capacity(partition, profile, arrivals)
    return sum(min(cap.get(t, 0.0), r) for t, r in arrivals.items())


@dataclasses.dataclass
class Decision:
    """What one control window decided (Controller.history keeps them)."""

    time_s: float
    arrivals: dict[str, float]  # smoothed req/s per tier
    starvation: dict[str, float]
    candidate: Partition
    current: Partition
    switched: bool
    reason: str


class Controller:
    """The adaptive-TP controller (module docstring). Feed it per-window counts with
    `observe`, ask `decide` once per window."""

    def __init__(self, profile: Profile, tiers: Sequence[Tier], num_devices: int, *,
                 degrees: Sequence[int] = (1, 2, 4, 8), initial: Partition | None = None,
                 window_s: float = 1.0, smoothing: float = 0.5, hysteresis: float = 0.1, confirm: int = 2,
                 min_dwell_s: float = 5.0, horizon_s: float = 10.0,
                 reconfig_s: Callable[[Partition, Partition], float] = lambda old, new: 1.0,
                 flap_window_s: float = 30.0):
        """smoothing: weight of the newest window in the arrival-rate average (1: no memory).
        flap_window_s: changes this close together double the dwell (module docstring); 0: off."""
        if num_devices < 1:
            raise ValueError(f"num_devices={num_devices} must be >= 1")
        bad = [d for d in degrees if d < 1 or d > num_devices]
        if not degrees or bad:
            raise ValueError(f"degrees={list(degrees)} must be in [1, {num_devices}]")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing={smoothing} must be in (0, 1]")
        if flap_window_s < 0:
            raise ValueError(f"flap_window_s={flap_window_s} must be >= 0")
        if window_s <= 0 or confirm < 1 or hysteresis < 0:
            raise ValueError(f"window_s={window_s} > 0, confirm={confirm} >= 1, hysteresis={hysteresis} >= 0 needed")
        self.profile, self.num_devices = profile, num_devices
        self.tiers = {t.name: t for t in tiers}
        self.degrees = sorted(set(degrees))
        self.window_s, self.smoothing, self.hysteresis, self.confirm = window_s, smoothing, hysteresis, confirm
        self.min_dwell_s, self.horizon_s, self.reconfig_s = min_dwell_s, horizon_s, reconfig_s
        self.flap_window_s = flap_window_s
        self._changes: list[float] = []  # times of the changes made
        self.current = (initial or self.plan({}, {})).canonical()
        if self.current.num_devices > num_devices:
            raise ValueError(f"initial partition {self.current} needs {self.current.num_devices} devices, "
                             f"{num_devices} available")
        self.rates: dict[str, float] = {}
        self._arrived: dict[str, float] = collections.defaultdict(float)
        self._served: dict[str, float] = collections.defaultdict(float)
        self._streak: tuple[Partition | None, int] = (None, 0)
        self._last_change = -math.inf
        self.history: list[Decision] = []

    # -- observation ---------------------------------------------------------------------------

    def observe(self, arrived: Mapping[str, int], served: Mapping[str, int] | None = None) -> None:
        """One window's arrivals per tier and how many of the window's finished requests met
        their SLO (served); updates the smoothed rates and the starvation counts."""
        a = self.smoothing
        for t in set(arrived) | set(self.rates):
            n = arrived.get(t, 0)
            self.rates[t] = a * n / self.window_s + (1 - a) * self.rates.get(t, n / self.window_s)
        decay = 1 - a
        for t in set(arrived) | set(self._arrived):
            self._arrived[t] = decay * self._arrived[t] + arrived.get(t, 0)
            self._served[t] = decay * self._served[t] + (served or {}).get(t, arrived.get(t, 0))

    def starvation(self) -> dict[str, float]:
        """arrivals / served per tier over the recent windows (>= 1; 1 when all were served)."""
        return {t: max(1.0, self._arrived[t] / self._served[t]) if self._served[t] > 0 else
                (4.0 if self._arrived[t] > 0 else 1.0) for t in self._arrived}

    # -- the choice ----------------------------------------------------------------------------

    def plan(self, rates: Mapping[str, float], starvation: Mapping[str, float]) -> Partition:
        """The best partition for these arrival rates (module docstring): every way of
        splitting the devices into instances of the allowed degrees, each dedicated to one
        tier with arrivals, scored by weighted goodput, then by the smallest headroom
        (capacity / arrivals) any tier is left with, then by fewer instances. (Shared
        instances are scored only as the current partition, by what they were seen to serve:
        `objective`; the profile cannot tell how tiers batched together interfere.)"""
        active = sorted(t.name for t in self.tiers.values() if t.judged and rates.get(t.name, 0.0) > 0)
        if not active:  # no demand to judge: every device an instance of the smallest degree, shared
            d = self.degrees[0]
            return Partition(tuple(InstancePlan(d) for _ in range(self.num_devices // d)))
        best, best_key = None, None
        value = self._value(starvation)
        for sizes in size_multisets(self.num_devices, self.degrees):
            for assignment in _assignments(sizes, active):
                cap = capacity(Partition(tuple(InstancePlan(tp, tier) for tp, tier in assignment)), self.profile,
                               rates, value)
                weighted = sum(value(t) * min(cap.get(t, 0.0), rates[t]) for t in active)
                headroom = min(min(cap.get(t, 0.0) / rates[t], 10.0) for t in active)
                key = (round(weighted, 9), round(headroom, 9), -len(assignment))
                if best_key is None or key > best_key:
                    best, best_key = assignment, key
        return Partition(tuple(InstancePlan(tp, tier) for tp, tier in best)).canonical()

    def objective(self, partition: Partition, rates: Mapping[str, float], starvation: Mapping[str, float]) -> float:
        """What plan maximises and decide compares: sum over tiers of weight * starvation *
        min(capacity, arrivals). A tier served by shared instances (the current partition's,
        as `route` sends it) gets at most what it was seen to be served (arrivals /
        starvation), so a shared partition that serves every tier stays, and one that starves a
        tier loses to a partition that would not."""
        value = self._value(starvation)
        cap = capacity(partition, self.profile, rates, value)
        for t in cap:
            if not any(i.tier == t for i in partition.instances):
                cap[t] = min(cap[t], rates.get(t, 0.0) / starvation.get(t, 1.0))
        return sum(value(t.name) * min(cap.get(t.name, 0.0), rates.get(t.name, 0.0))
                   for t in self.tiers.values() if t.judged)

    def _value(self, starvation: Mapping[str, float]) -> Callable[[str], float]:
        """A tier's weight in the objective: its tier weight times its starvation."""
        return lambda tier: self.tiers[tier].weight * starvation.get(tier, 1.0) if tier in self.tiers else 0.0

    def decide(self, now: float) -> Partition | None:
        """The partition to switch to now, or None to keep the current one (module docstring)."""
        starvation = self.starvation()
        candidate = self.plan(self.rates, starvation)
        streak = self._streak[1] + 1 if candidate == self._streak[0] else 1
        self._streak = (candidate, streak)
        cur_g = self.objective(self.current, self.rates, starvation)
        new_g = self.objective(candidate, self.rates, starvation)
        if candidate == self.current:
            reason = "same partition"
        elif streak < self.confirm:
            reason = f"seen {streak} of {self.confirm} windows"
        elif now - self._last_change < self.dwell_s():
            reason = f"dwell: {now - self._last_change:.1f} s < {self.dwell_s():g} s since the last change"
        elif new_g < (1 + self.hysteresis) * cur_g or new_g <= cur_g:
            reason = f"gain too small: {new_g:.2f} vs {cur_g:.2f} weighted req/s"
        elif (new_g - cur_g) * self.horizon_s <= cur_g * self.reconfig_s(self.current, candidate):
            reason = (f"reconfiguration ({self.reconfig_s(self.current, candidate):.2f} s) costs more than "
                      f"the gain over {self.horizon_s} s")
        else:
            reason = f"weighted goodput {cur_g:.2f} -> {new_g:.2f} req/s"
        switched = reason.startswith("weighted goodput")
        self.history.append(Decision(now, dict(self.rates), starvation, candidate, self.current, switched, reason))
        if not switched:
            return None
        self.current, self._last_change = candidate, now
        self._changes = self._changes[-32:] + [now]  # a run past 32 changes is at the cap anyway
        return candidate

    def dwell_s(self) -> float:
        """The least time the current partition stays: min_dwell_s (at least one window once
        changes run together), doubled for each change in the run that ended with the last one,
        never more than flap_window_s. A run is changes each less than twice flap_window_s after
        the one before: a flapper held at the cap stays in its run; a calm spell ends it."""
        run = 0
        for earlier, later in zip(reversed(self._changes[:-1]), reversed(self._changes)):
            if later - earlier >= 2 * self.flap_window_s:
                break
            run += 1
        if not run:
            return self.min_dwell_s
        return min(max(self.min_dwell_s, self.window_s) * 2 ** run, max(self.min_dwell_s, self.flap_window_s))


def size_multisets(num_devices: int, degrees: Sequence[int]) -> list[tuple[int, ...]]:
    """Every multiset of `degrees` summing to num_devices, largest degrees first."""
    def walk(n, allowed):
        if n == 0:
            yield ()
            return
        for k, d in enumerate(allowed):
            if d <= n:
                for rest in walk(n - d, allowed[k:]):
                    yield (d,) + rest

    return list(walk(num_devices, sorted(set(degrees), reverse=True)))


def _assignments(sizes: tuple[int, ...], tiers: Sequence[str]):
    """Every way to give each instance of `sizes` one of `tiers`, up to reordering equal
    instances: lists of (tp, tier)."""
    groups = collections.Counter(sizes)

    def spread(count, k):  # count identical items over k bins
        if k == 1:
            yield (count,)
            return
        for first in range(count, -1, -1):
            for rest in spread(count - first, k - 1):
                yield (first,) + rest

    def walk(degrees):
        if not degrees:
            yield []
            return
        d, rest = degrees[0], degrees[1:]
        for split in spread(groups[d], len(tiers)):
            for tail in walk(rest):
                yield [(d, t) for t, c in zip(tiers, split) for _ in range(c)] + tail

    yield from walk(sorted(groups, reverse=True))


def route(partition: Partition, tier: str, outstanding: Sequence[int]) -> tuple[int, bool]:
    """(instance index, feasible) for a request of `tier`: the least-loaded instance that serves
    it (feasible), else the least-loaded instance of all (best effort)."""
    own = partition.serving(tier)
    pool = own or range(len(partition.instances))
    k = min(pool, key=lambda i: (outstanding[i], i))
    return k, bool(own)


class NitsumControl:
    """A Controller as jinfer.instances.TopologyControl: InstanceGroup routes with it and asks
    it for new instance sizes once per window (instance i serves controller.current's i-th)."""

    def __init__(self, controller: Controller):
        self.controller = controller
        self.window_s = controller.window_s
        self.degrees = tuple(controller.degrees)

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.controller.current.sizes

    def route(self, tier: str, outstanding: Sequence[int]) -> int:
        return route(self.controller.current, tier, outstanding)[0]

    def observe(self, arrived: Mapping[str, int], served: Mapping[str, int]) -> None:
        self.controller.observe(arrived, served)

    def decide(self, now: float) -> tuple[int, ...] | None:
        new = self.controller.decide(now)
        return None if new is None else new.sizes


def build_control(profile_path: str, tiers: Sequence[Tier], sizes: Sequence[int], num_devices: int,
                  window_s: float = 1.0) -> NitsumControl:
    """The controller a server runs (engine.adaptive_tp): the profile from its JSON file, the
    server's tiers, starting from `sizes` with every instance shared (the first window's
    arrivals decide the rest). ValueError naming a bad file."""
    import json

    try:
        with open(profile_path) as f:
            profile = Profile.from_dict(json.load(f))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"engine.adaptive_tp={profile_path!r}: not a readable profile ({e})") from None
    degrees = [d for d in profile.degrees if d <= num_devices] or [1]
    initial = Partition(tuple(InstancePlan(int(n)) for n in sizes)).canonical()
    return NitsumControl(Controller(profile, tiers, num_devices, degrees=degrees, initial=initial, window_s=window_s))
