"""Drafts or not: per batch-size class, whether decode steps planned in drafting mode deliver
more output tokens per second than plain steps (which pipeline, as plain decoding does),
measured on the steps themselves (CostAwareBudget.wants_drafts asks `DraftsOrNot.choose`).

A sample is one step as its engine reports it: its output tokens over its time, which for
pipelined steps is the time between two steps' results, so a pipelined step is not charged the
one before it. A step counts for the mode it was planned in: one in drafting mode that carried
no draft (the drafter had nothing) still waited for the step before it where drafted steps are
read one at a time (without drafts in flight: jinfer/drafting.py). Rates of steps of decodes
only are compared where both ways have them; a step that also prefills (its prompt chunk
dominates its time) counts only while a way has nothing else. Each way is tried for a run of
steps, not alternately (without drafts in flight, every switch from pipelined steps to drafting
mode empties the pipeline), plain steps first, and only in steps without prompt chunks; a way
that falls below give_up of the other's rate ends its run at that step; a tie goes to plain
steps. A batch-size class first met after a class within a factor of 4 of it measured both ways
runs the way that class prefers and takes its ratio of the two as the other way's. Once a class
is decided, the losing way gets explore_len steps per cycle, the cycle as long as keeps their
cost within explore_cost (4 %) of the throughput, fixed when the cycle begins: short where the
loser loses narrowly (it may have become the better way: a drafter's history grows), long where
it loses badly; an exploration also ends at the first step where the loser falls clearly
behind.
"""

from __future__ import annotations

import dataclasses


def size_class(num_decoding: int) -> int:
    """The batch-size class of num_decoding decoding requests: the power of two at or above it."""
    return 1 << max(0, num_decoding - 1).bit_length()


@dataclasses.dataclass
class Way:
    """One way (drafts or none) in one batch-size class."""

    decode: float = 0.0
    """Output tokens per second, moving average over its steps of decodes only."""
    decodes: int = 0
    every: float = 0.0
    """The same over all its steps (prompt chunks too)."""
    steps: int = 0
    chosen: int = 0
    """Steps it was chosen for in its first run."""

    def add(self, rate: float, decode_only: bool, ema: float) -> None:
        self.every = rate if self.steps == 0 else (1 - ema) * self.every + ema * rate
        self.steps += 1
        if decode_only:
            self.decode = rate if self.decodes == 0 else (1 - ema) * self.decode + ema * rate
            self.decodes += 1


def measured_ratio(plain: Way, draft: Way) -> float | None:
    """Drafted / plain tokens per second: over steps of decodes only where both ways have
    some, else over all their steps; None while a way has no step."""
    if plain.decodes and draft.decodes:
        a, b = draft.decode, plain.decode
    elif plain.steps and draft.steps:
        a, b = draft.every, plain.every
    else:
        return None
    return a / b if b > 0 else float("inf") if a > 0 else 1.0


class DraftsOrNot:
    """The measured drafts-or-not choice per batch-size class (module doc); config: a
    scheduler.speculation.budget.BudgetConfig (arm_samples, explore_cost, explore_len,
    give_up, ema)."""

    def __init__(self, config):
        self.config = config
        self.ways: dict[int, dict[bool, Way]] = {}  # class -> {drafted: Way}
        self._prior: dict[int, float] = {}  # class -> drafted / plain ratio of a measured class near it
        # class -> [steps decided in its exploration cycle so far, its length, the way it explores]
        self._cycles: dict[int, list] = {}

    def observe(self, seconds: float, emitted: int, drafting: bool, num_decoding: int, all_decoding: bool) -> None:
        """A step of num_decoding decoding sequences (all_decoding: and nothing else) emitted
        `emitted` tokens in `seconds`, planned in drafting mode or not."""
        if seconds <= 0 or num_decoding <= 0:
            return
        key = size_class(num_decoding)
        ways = self._of(key)
        way = ways[drafting]
        way.add(emitted / seconds, all_decoding, self.config.ema)
        if not all_decoding and ways[False].decodes and ways[True].decodes:
            return  # the decode-only rates decide, and this step moved neither
        ratio = measured_ratio(ways[False], ways[True])
        if ratio is None or (ratio if drafting else 1 / max(ratio, 1e-12)) >= self.config.give_up:
            return
        way.chosen = max(way.chosen, self.config.arm_samples)  # a first run ends here
        cycle = self._cycles.get(key)
        if cycle is not None and cycle[0] > cycle[1] - self.config.explore_len:
            cycle[0] = cycle[1]  # so does an exploration: the next step starts a cycle

    def choose(self, num_decoding: int, prefilling: bool = False) -> bool:
        """Whether the next step should carry drafts (module doc); never with no request
        decoding (nothing to draft for: such a step is no way's). A step that will carry
        prompt chunks (prefilling) takes the better way when the class has one, else plain
        steps, and neither runs nor explorations advance: a prompt chunk dominates its time
        (and one in drafting mode waits for the step before it)."""
        if num_decoding <= 0:
            return False
        key = size_class(num_decoding)
        ways = self._of(key)
        plain, draft = ways[False], ways[True]
        n = self.config.arm_samples
        ratio = measured_ratio(plain, draft)
        if prefilling:
            decided = plain.chosen >= n and draft.chosen >= n and ratio is not None
            return decided and ratio > 1
        if key in self._prior:
            if ratio is None:  # a way not seen here yet: the measured class's ratio stands for it
                ratio = self._prior[key]
            lead = self._prior[key] > 1
            if ways[lead].chosen < n:
                ways[lead].chosen += 1
                return lead
            ways[not lead].chosen = n
        if plain.chosen < n:  # plain steps' run first, then the drafts'
            plain.chosen += 1
            return False
        if draft.chosen < n:
            draft.chosen += 1
            return True
        best = ratio > 1 if ratio is not None else draft.steps > plain.steps  # (a tie: plain steps pipeline)
        cycle = self._cycles.setdefault(key, [0, self._period(ratio), not best])
        if cycle[0] >= cycle[1]:  # a new cycle: its length and the way it explores from now
            cycle[:] = [0, self._period(ratio), not best]
        cycle[0] += 1
        return best if cycle[0] <= cycle[1] - self.config.explore_len else cycle[2]

    def _period(self, ratio: float | None) -> int:
        """Steps per exploration cycle (explore_len of them the losing way's): the losing way
        at `ratio` of the better one's rate (drafted / plain, either way round) costs
        1 - ratio per step it runs, so it may run explore_cost / (1 - ratio) of the steps, at
        most half (with its rate unknown: explore_cost)."""
        cost = 1.0 if ratio is None else 1 - min(ratio, 1 / ratio) if ratio > 0 else 1.0
        share = min(0.5, self.config.explore_cost / max(cost, 1e-9))
        return max(2 * self.config.explore_len, round(self.config.explore_len / share))

    def _of(self, key: int) -> dict[bool, Way]:
        """The class's ways; a new class notes the ratio of the nearest class within a factor
        of 4 that measured both ways itself (a prior taken from a prior could drift across
        regimes)."""
        if key not in self.ways:
            n = self.config.arm_samples
            apart = lambda k: abs(k.bit_length() - key.bit_length())  # noqa: E731 - factors of 2
            measured = {k: r for k, w in self.ways.items() if k not in self._prior and apart(k) <= 2
                        and w[False].chosen >= n and w[True].chosen >= n
                        and (r := measured_ratio(w[False], w[True])) is not None}
            if measured:
                self._prior[key] = measured[min(measured, key=lambda k: (apart(k), k))]
            self.ways[key] = {False: Way(), True: Way()}
        return self.ways[key]
