"""Goodput of one server per SLO tier: which finished samples met their tier's targets.

A sample meets its SLO (jinfer.config.Tier.met) when its TTFT (arrival at the engine to its
first token) and its TPOT (mean time per output token after the first; not judged with a single
token) are both within its tier's targets. Goodput is how many samples met it per second, and
their output tokens per second, over the server's uptime and over the last `window_s`. Samples
of a tier without targets, or of a best-effort one, count as finished, never as met or missed.

Counts are in samples: a request of n samples counts n (one in the usual case). The times are
the server's, so they leave out the network and the client: a client's TTFT is longer, and a
client that judges by the same targets usually sees fewer met.

Always on (a few dict updates per finished sample, whether or not metrics are served): the
engine thread writes through the EngineLoop listener hooks, any thread reads `snapshot()`, and
one lock orders them. ServerMetrics exports the same numbers to Prometheus; GetServerStats
answers with them.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time

from jinfer.config import Tier


def sample_times(out) -> tuple[float, float]:
    """(TTFT, TPOT) of a finished sample's RequestOutput, in seconds: TTFT inf without a first
    token, TPOT nan with fewer than two tokens (nothing to judge)."""
    if out.first_token_time is None:
        return math.inf, math.nan
    ttft = out.first_token_time - out.arrival_time
    if len(out.token_ids) < 2 or out.finish_time is None:
        return ttft, math.nan
    return ttft, (out.finish_time - out.first_token_time) / (len(out.token_ids) - 1)


@dataclasses.dataclass(frozen=True)
class TierGoodput:
    """One tier's account since the server started (counts in samples, rates per second)."""

    tier: Tier
    finished: int  # ended with a stop or at their length, judged or not
    slo_met: int  # of them, within both targets (judged tiers only)
    ttft_missed: int  # of them, over the TTFT target
    tpot_missed: int  # of them, over the TPOT target (a sample may miss both)
    goodput_tokens: int  # output tokens of the samples that met their SLO
    aborted: int  # ended early: cancelled, past their deadline, or a step failed
    refused: int  # refused by the scheduling policy's admission check (RESOURCE_EXHAUSTED)
    demoted: int  # demoted to best effort by the policy (its `demotions` counter, when it keeps one)
    goodput_rps: float  # slo_met / uptime
    goodput_tokens_per_s: float  # goodput_tokens / uptime
    recent_goodput_rps: float  # over the last window_s (the uptime, while shorter)
    recent_goodput_tokens_per_s: float


@dataclasses.dataclass(frozen=True)
class GoodputStats:
    """A snapshot: every tier of the server, in its priority order, then any others seen."""

    uptime_s: float
    window_s: float
    tiers: tuple[TierGoodput, ...]

    def tier(self, name: str) -> TierGoodput:
        """The tier called `name` (KeyError naming it if none)."""
        for t in self.tiers:
            if t.tier.name == name:
                return t
        raise KeyError(name)


@dataclasses.dataclass
class _Counts:
    finished: int = 0
    slo_met: int = 0
    ttft_missed: int = 0
    tpot_missed: int = 0
    goodput_tokens: int = 0
    aborted: int = 0
    refused: int = 0


@dataclasses.dataclass
class _Live:
    tier: Tier
    left: int  # samples not finished yet


class Goodput:
    """The server's per-tier goodput ledger; an EngineLoop listener.

    policy: the engine's scheduling policy; when it keeps a `demotions` Counter (tier name ->
    requests demoted, as scheduler.slo.policies.SloAware does), the snapshot reports it per tier.
    """

    def __init__(self, tiers: tuple[Tier, ...], policy=None, window_s: float = 60.0, clock=time.monotonic):
        """tiers: the server's (ServingConfig.tier_table); clock: the engine's time base."""
        if not window_s > 0:
            raise ValueError(f"window_s={window_s} must be > 0")
        self.window_s = window_s
        self._clock = clock
        self._policy = policy
        self._tiers = {t.name: t for t in tiers}
        self._counts = {t.name: _Counts() for t in tiers}
        self._demoted: dict[str, int] = {}
        self._live: dict[str, _Live] = {}  # request id -> its tier and unfinished samples (engine thread only)
        self._recent: collections.deque[tuple[float, str, int]] = collections.deque()  # (time, tier, tokens) met
        self._lock = threading.Lock()
        self.started = clock()

    def _row(self, tier: Tier) -> _Counts:
        if tier.name not in self._counts:  # a tier outside the server's table: counted all the same
            self._tiers[tier.name] = tier
            self._counts[tier.name] = _Counts()
        return self._counts[tier.name]

    # -- called on the engine thread ---------------------------------------------------------

    def on_admit(self, request_id: str, tier: Tier | None, n: int) -> None:
        if tier is not None:  # the server always names one; an engine used without tiers is not judged
            self._live[request_id] = _Live(tier, n)

    def on_refused(self, tier: Tier | None, n: int) -> None:
        if tier is not None:
            with self._lock:
                self._row(tier).refused += n

    def on_outputs(self, outputs, now: float | None = None) -> None:
        """After each step: judges the samples that finished, and copies the policy's demotion
        counts (they change while the step is scheduled; read here, on the thread that changes
        them, before any stream hears of the step)."""
        now = self._clock() if now is None else now
        demotions = getattr(self._policy, "demotions", None)
        with self._lock:
            if demotions:
                self._demoted = dict(demotions)
            for out in outputs:
                live = self._live.get(out.request_id) if out.finished else None
                if live is None:
                    continue
                live.left -= 1
                tier, row = live.tier, self._row(live.tier)
                if out.finish_reason == "abort":
                    row.aborted += 1
                    continue
                row.finished += 1
                if not tier.judged:
                    continue
                ttft, tpot = sample_times(out)
                if tier.met(ttft, tpot):
                    row.slo_met += 1
                    row.goodput_tokens += len(out.token_ids)
                    self._recent.append((now, tier.name, len(out.token_ids)))
                    continue
                row.ttft_missed += ttft > tier.ttft_s
                row.tpot_missed += tpot > tier.tpot_s  # nan (one token) is never a miss
            self._prune(now)

    def on_done(self, request_id: str) -> None:
        """The request left the engine: samples that had not finished were aborted."""
        live = self._live.pop(request_id, None)
        if live is not None and live.left > 0:
            with self._lock:
                self._row(live.tier).aborted += live.left

    # -- any thread ----------------------------------------------------------------------------

    def _prune(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()

    def snapshot(self, now: float | None = None) -> GoodputStats:
        now = self._clock() if now is None else now
        with self._lock:
            self._prune(now)
            uptime = max(now - self.started, 1e-9)
            span = min(self.window_s, uptime)
            recent_n: collections.Counter = collections.Counter()
            recent_tokens: collections.Counter = collections.Counter()
            for _, name, tokens in self._recent:
                recent_n[name] += 1
                recent_tokens[name] += tokens
            names = list(self._counts) + [n for n in self._demoted if n not in self._counts]
            tiers = []
            for name in names:
                c = self._counts.get(name, _Counts())
                tiers.append(TierGoodput(
                    self._tiers.get(name) or Tier(name), c.finished, c.slo_met, c.ttft_missed, c.tpot_missed,
                    c.goodput_tokens, c.aborted, c.refused, self._demoted.get(name, 0), c.slo_met / uptime,
                    c.goodput_tokens / uptime, recent_n[name] / span, recent_tokens[name] / span))
        return GoodputStats(uptime, self.window_s, tuple(tiers))
