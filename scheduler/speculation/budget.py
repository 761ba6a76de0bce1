"""How much to speculate: a draft budget from a step-cost model and each request's acceptance.

A draft token costs its step's compute whether or not it is accepted. With B requests decoding,
a step costs t(B) = c_base + c_tok * B and yields B tokens, so a token is worth t(B) / B of
time; one more draft token adds c_tok and yields, at draft depth j, alpha^j expected tokens
(alpha: the request's chance that a draft token is accepted, given its parent was). It pays
when alpha^j * t(B) / B >= c_tok, i.e. alpha^j >= tau = c_tok * B / t(B). So at batch 1 on a
machine where a step's fixed cost dominates, tau is small and drafts run long; at a large batch
where every token costs compute, tau nears 1 and only near-certain drafts survive.

Whether to draft at all is measured rather than modelled: per batch-size class the budget
compares the output tokens per second of steps planned in drafting mode and of plain steps
(which pipeline, as plain decoding does) and keeps the better, re-trying the other now and then
(scheduler/speculation/ways.py).

c_base and c_tok are fitted online (a robust line through recent steps' token counts and times,
each from the step before it being read; steps that compiled are not reported), so the budget
follows the machine it runs on, CPU or GPU. The samples are every step whose timing the engine
states, each of its timing kind: one pipeline period for a step dispatched before the step
ahead of it was read (with drafts in flight, drafted steps too), its whole time for one
that was not (the first after the engine was idle or read a step out of band, one after a step
read at once: any drafted one without drafts in flight); a caller that does
not say has its drafted steps alone counted. The line is fitted to the kind most recent drafted
steps had, and only through the steps of at most as many tokens as the decision's batch with
full drafts (decision_range): on a GPU a step's cost is flat over that range and rises only
past it, so a prompt chunk's hundreds of tokens would tilt the line. Where the range gives no
line (too few steps, token counts too close together for their slope to be more than noise)
it is widened by factors of 2. Plain decodes and short prompt chunks can so give a line before
a run's first draft. Until a line exists, drafts are 1 token per request, doubling with each
drafted step seen only while no timing kind's steps in range have the spread of token counts a
line needs (three token counts at least), then 1 for up to 2 * min_steps drafted steps
(unfitted_limit): a first drafted step of unknown cost stays small (on a CPU a step of many
draft tokens can cost several plain steps). alpha is estimated per request (accepted tokens /
(accepted + rejections), with the pool of all requests as a prior), so a request whose text
the drafter predicts keeps long drafts and one it does not stops drafting, probing with one
token now and then in case its text turns repetitive. A step's drafts, once chosen, are fitted
to the runner's token buckets (fit_to_buckets): the token that takes a step past a bucket
costs that bucket's padding, priced at the measured median of steps of that shape where enough
were seen (step_costs; on a CPU a step's cost is not a line in its rows), else by the line. Once
steps are fitted, a request's limit is at least what that fit keeps of a full draft for it alone,
and the first unfitted drafted steps stay within twice the bucket of their decodes (unfitted_limit).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import statistics
from collections.abc import Sequence

from scheduler.speculation.ways import DraftsOrNot


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    """Knobs of CostAwareBudget."""

    window: int = 128
    """Recent steps the cost model is fitted to."""
    prior_weight: float = 4.0
    """How many verifications' worth the pooled acceptance counts in a request's estimate."""
    probe_every: int = 16
    """A request denied drafts gets a one-token probe after this many steps."""
    min_steps: int = 8
    """Steps (with at least three token counts) before the cost model is trusted; until then drafts are allowed."""
    arm_samples: int = 4
    """Steps each way (drafting mode, plain) is chosen for in its first run per batch-size class
    (cut short by give_up) before their throughputs are compared."""
    explore_cost: float = 0.04
    """The share of output tokens per second that re-trying the losing way may cost (the
    machine, the text, the batch may have changed): it gets explore_len steps in every cycle
    of explore_len * (1 - its ratio to the better way) / explore_cost steps (at most half of
    them are its; explore_len in 150 when its rate is unknown), so a way that loses narrowly is
    re-tried often and one that loses badly seldom."""
    explore_len: int = 6
    give_up: float = 0.9
    """A way being tried whose tokens per second falls below this fraction of the other way's
    (measured) ends its run at that step: a clear loser costs a step or two, not a whole run."""
    ema: float = 0.2
    """Weight of the newest step in each way's throughput average."""
    max_lead: int | None = None
    """For closed batches (offline runs, RL rollouts: the batch's time is its slowest request's):
    while no request waits, a request drafts only until it is this many tokens ahead of the
    furthest-behind other running request (DraftBudget.lead_limit). None: no limit (serving:
    a request that finishes early is lower latency, and its place goes to a waiting one)."""

    def __post_init__(self):
        if self.window < 2 or self.min_steps < 2 or self.prior_weight < 0 or self.probe_every < 1:
            raise ValueError(f"{self}: need window >= 2, min_steps >= 2, prior_weight >= 0, probe_every >= 1")
        if self.arm_samples < 1 or self.explore_len < 1 or not 0 < self.ema <= 1 or not 0 < self.explore_cost <= 1:
            raise ValueError(f"{self}: need arm_samples, explore_len >= 1 and ema, explore_cost in (0, 1]")
        if not 0 <= self.give_up <= 1:
            raise ValueError(f"{self}: need give_up in [0, 1]")
        if self.max_lead is not None and self.max_lead < 0:
            raise ValueError(f"{self}: need max_lead >= 0 (or None: no limit)")


class CostAwareBudget:
    """jinfer.speculation.DraftBudget: draft tokens only while they are expected to pay."""

    def __init__(self, config: BudgetConfig = BudgetConfig()):
        self.config = config
        # (token count, seconds) by timing kind (pipelined: one pipeline period; False: a whole
        # step; None: a caller that does not say, whose drafted steps alone are samples)
        self._samples = {kind: collections.deque(maxlen=config.window) for kind in (True, False, None)}
        self._fits: dict[tuple, object] = {}  # (kind, up_to) -> fit, and step_costs', until any new sample
        self._chosen: dict[int | None, tuple | None] = {}  # up_to -> cost_model's (kind, line), likewise
        self._last_fit: dict[bool | None, tuple[float, float] | None] = {}  # kind -> its whole window's last line
        self._longest_draft = 0  # the most draft tokens limit() was asked about for one request
        self._drafted_kinds: collections.deque = collections.deque(maxlen=config.window)  # recent drafted steps'
        self.ways = DraftsOrNot(config)
        self._drafted_steps = 0
        self._held_from: int | None = None  # drafted steps seen when unfitted drafts were first held at 1
        self._requests: dict[str, list[float]] = {}  # id -> [accepted, rejections, steps since a draft]
        self._pool = [1.0, 1.0]  # accepted, rejections over every request (a uniform prior)
        self._probing: set[str] = set()  # requests limit() last gave a probe (fit_to_buckets keeps it)
        self._buckets: tuple[int, ...] | None = None  # the token buckets fit_to_buckets was last asked about

    @classmethod
    def from_config(cls, spec) -> "CostAwareBudget":
        """From the launch config's speculation section (entrypoints.build.build_draft_budget)."""
        return cls(BudgetConfig(max_lead=spec.max_lead or None))

    # -- the cost model --------------------------------------------------------------------

    def observe_step(self, num_tokens: int, seconds: float, emitted: int = 0, drafted: bool = True, *,
                     num_decoding: int = 0, decode_only: bool = False, drafting: bool | None = None,
                     pipelined: bool | None = None) -> None:
        if drafted:
            self._drafted_steps += 1
            self._drafted_kinds.append(pipelined)
        if drafted or pipelined is not None:  # cost samples: drafted steps, and others where timed
            self._samples[pipelined].append((num_tokens, seconds, _program(drafted, decode_only)))
            self._fits.clear()  # (fitted again only when a limit is asked for)
            self._chosen.clear()
        # the ways are the modes: without drafts in flight, a step in drafting mode without a
        # draft still waited for the step before it (its drafts needed that step's tokens)
        self.ways.observe(seconds, emitted, drafted if drafting is None else drafting, num_decoding, decode_only)

    # -- drafts at all? ------------------------------------------------------------------------

    def wants_drafts(self, num_decoding: int, *, prefilling: bool = False) -> bool:
        """Per batch-size class, the way (drafts or none) whose measured output tokens per
        second is higher (scheduler/speculation/ways.py). This catches costs the cost model
        cannot see: the pipelining a step without drafts keeps, kernel shapes, host work."""
        return self.ways.choose(num_decoding, prefilling)

    def unfitted_limit(self, max_draft_tokens: int, num_decoding: int = 1) -> int:
        """Draft tokens per request while there is no cost model. While the steps of each
        timing kind within the decision's range (decision_range) have fewer than three token
        counts or counts close together (plain decodes of one batch), 1, then doubling with each
        drafted step seen (1, 2, 4, ...): a line, fitted within one kind, needs counts that
        differ, and the first drafted steps, of unknown cost, stay small. Once a kind has that
        spread and the line waits only for more steps, 1 (on a CPU a batch of 8 with 8 draft
        tokens each cost as much as 5 plain steps, more than the half of them accepted saved,
        before its line was fitted), for up to 2 * min_steps drafted steps; steps too noisy for
        a line by then double again. Once the token buckets are known (fit_to_buckets), the
        first 2 * min_steps drafted steps also keep a step's decodes and drafts within max(4,
        twice the bucket of its decodes) rows, and the ramp resumes from 2 after them: at batch
        32 on a CPU, the ramp's 2 tokens each took steps to 128 rows, 4.5 plain steps (a batch
        of as many requests as slots ran 8-13 % slower than without speculation)."""
        up_to = self.decision_range(num_decoding)
        in_range = ([t for t, *_ in samples if t <= up_to] for samples in self._samples.values())
        capped = self._buckets is not None and self._drafted_steps < 2 * self.config.min_steps
        if any(_spread_for_a_line(counts, _min_span(up_to)) for counts in in_range):
            if self._held_from is None:
                self._held_from = self._drafted_steps
            held = self._drafted_steps - self._held_from - 2 * self.config.min_steps
            limit = 1 if held < 0 else 1 << min(held + 1, 16)
        elif self._buckets is None or capped:
            limit = 1 << min(self._drafted_steps, 16)
        else:  # past the capped steps: the ramp from 2
            limit = 1 << min(self._drafted_steps - 2 * self.config.min_steps + 1, 16)
        if capped:
            batch = max(1, num_decoding)
            rows = max(4, 2 * next((b for b in self._buckets if b >= batch), batch))
            limit = min(limit, max(1, (rows - batch) // batch))
        return min(max_draft_tokens, limit)

    def cost_model(self, up_to: int | None = None) -> tuple[float, float] | None:
        """(c_base, c_tok) in seconds: the line of the steps of the timing kind most recent
        drafted steps had (pipelined before any; module doc), else of another kind, or None
        until enough varied steps of one were seen. up_to: through the steps of at most that
        many tokens (the range a draft decision spans: on a GPU a step's cost is flat over the
        decode range and rises only past it, so a prompt chunk's hundreds of tokens would tilt
        the line), widened by factors of 2 while the range gives no line (too few steps, fewer
        than three token counts, or a line through zero or below at no tokens, whose tau would be 1). Kept
        until the next sample."""
        if up_to not in self._chosen:
            self._chosen[up_to] = next(((kind, fit) for kind in self._kinds()
                                        if (fit := self._fit_of(kind, up_to)) is not None), None)
        chosen = self._chosen[up_to]
        return None if chosen is None else chosen[1]

    def _kinds(self) -> list[bool | None]:
        """The timing kinds, that of most recent drafted steps first (pipelined before any)."""
        return sorted(self._samples, key=lambda k: (-self._drafted_kinds.count(k), k is not True))

    def step_costs(self, buckets: Sequence[int], kind: bool | None = None) -> dict[tuple[int, str], float]:
        """Measured seconds of a step by shape, (the token bucket it was padded to, its program:
        "drafts" carried drafts, "decode" only decodes, "mixed" a prompt chunk too): the median
        of the recent steps of one timing kind (default: the kind most recent drafted steps
        had), for each shape seen at least _MIN_SHAPE_STEPS times. On a CPU a step's cost is not
        a line in its padded rows: a batch-1 step of 2 rows costs 1.5x one of 1 row and more
        than one of 4 (its 2-row matmuls take a slower path); on a GPU a decode-only step may
        take the attention's decode path, and a drafts step the tree mask."""
        kind = self._kinds()[0] if kind is None else kind
        key = ("shapes", kind, tuple(buckets))  # (kept with the lines, until the next sample)
        if key not in self._fits:
            by_shape: dict[tuple[int, str], list[float]] = collections.defaultdict(list)
            for t, sec, program in self._samples[kind]:
                if t <= buckets[-1]:
                    by_shape[next(b for b in buckets if b >= t), program].append(sec)
            self._fits[key] = {shape: statistics.median(v) for shape, v in by_shape.items()
                               if len(v) >= _MIN_SHAPE_STEPS}
        return dict(self._fits[key])

    def _fit_of(self, kind: bool | None, up_to: int | None) -> tuple[float, float] | None:
        """The line through the steps of one timing kind of at most up_to tokens (cost_model),
        fitted by Theil-Sen (the median of pairwise slopes over distinct token counts), so one
        slow step (a stray compile, a busy machine) does not move it. Where the whole window
        gives no line (too few token counts), the kind's last line through the whole window
        stands."""
        key = (kind, up_to)
        if key not in self._fits:
            samples = self._samples[kind]
            steps = [(t, sec) for t, sec, _ in samples if up_to is None or t <= up_to]
            fit = _theil_sen(steps, self.config.min_steps, _min_span(up_to))
            if fit is None and up_to is not None:
                wider = 2 * up_to if any(t > 2 * up_to for t, *_ in samples) else None
                fit = self._fit_of(kind, wider)
            elif up_to is None:
                fit = self._last_fit[kind] = fit or self._last_fit.get(kind)
            self._fits[key] = fit
        return self._fits[key]

    def decision_range(self, num_decoding: int) -> int:
        """The most tokens a step of num_decoding decoding requests holds when each drafts up to
        the longest draft limit() was asked about (at least 8): the range of token counts a
        draft decision spans, to which the cost line is fitted."""
        return max(1, num_decoding) * (1 + max(8, self._longest_draft))

    def lead_limit(self) -> int | None:
        """The configured max_lead (DraftBudget.lead_limit: closed batches only)."""
        return self.config.max_lead

    # -- acceptance ------------------------------------------------------------------------

    def alpha(self, request_id: str) -> float:
        """The request's estimated chance that a draft token is accepted (given its parent)."""
        pool_acc, pool_rej = self._pool
        w = self.config.prior_weight
        prior = pool_acc / (pool_acc + pool_rej)
        acc, rej, _ = self._requests.get(request_id, (0.0, 0.0, 0.0))
        return (acc + w * prior) / (acc + rej + w)

    def observe_verify(self, request_id: str, accepted: int, rejected: bool) -> None:
        st = self._requests.setdefault(request_id, [0.0, 0.0, 0.0])
        st[0] += accepted
        st[1] += rejected
        self._pool[0] += accepted
        self._pool[1] += rejected

    def finish(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self._probing.discard(request_id)

    # -- the decision ----------------------------------------------------------------------

    def _decision_fit(self, num_decoding: int, max_draft_tokens: int) -> tuple[float, float] | None:
        """The cost line for a draft decision at this batch (cost_model over decision_range)."""
        self._longest_draft = max(self._longest_draft, max_draft_tokens)
        return self.cost_model(up_to=self.decision_range(num_decoding))

    def fit_to_buckets(self, drafts: Sequence[tuple[str, int]], base_tokens: int, buckets: Sequence[int],
                       num_decoding: int) -> list[int]:
        """Draft lengths for a step padded to the next of `buckets` (DraftBudget.fit_to_buckets):
        of the bucket sizes from the one base_tokens needs up to the one every draft needs, the
        one whose draft tokens that fit, the most valuable first (draft_values), are worth the
        most less the step's cost at that size; ties go to the smaller bucket and, among tokens,
        to requests earlier in the plan. A token is worth a plain step's time over its batch; a
        step's cost is the measured median of its shape (step_costs: bucket, program) where
        one was seen often enough, else the cost line's (both of the timing kind the line was
        fitted to; with neither measured a row's price is tau, as in limit). Keeping no draft
        at all (a plain step) is a candidate too, beside filling a bucket's padding. A CPU pads
        a step of 9 tokens to 16 rows: the ninth token of a batch-1 draft costs 7 padded rows
        for its alpha^8; a 1-token draft at batch 1 takes a 2-row step that costs half a plain
        step more there. A probe (limit's one token for a request denied drafts) is kept
        whatever it costs in rows the step takes anyway; past them it is worth its acceptance
        like any token (on this CPU a probe takes a batch-32 step from 32 rows to 64, about two
        plain steps; sampled rollouts at batch 32, whose drafts were single tokens, ran 2-11 %
        slower than without speculation). Without a cost line, the drafts as they are."""
        lengths, up_to = [k for _, k in drafts], self.decision_range(num_decoding)
        self._buckets = tuple(buckets)
        if self.cost_model(up_to) is None or not drafts:
            return lengths
        kind, (c_base, c_tok) = self._chosen[up_to]
        measured, batch = self.step_costs(buckets, kind), max(1, num_decoding)
        plain = "decode" if base_tokens <= num_decoding else "mixed"
        cost = lambda b, n: measured.get((b, "drafts" if n else plain), c_base + c_tok * b)  # noqa: E731
        worth = cost(next(b for b in buckets if b >= batch), 0) / batch  # a plain decode's seconds a token
        free = next(b for b in buckets if b >= base_tokens) - base_tokens  # rows a probe rides free
        values = []
        for n, (rid, k) in enumerate(drafts):  # (in plan order: free rows go to earlier probes)
            for i, v in enumerate(self.draft_values(rid, k, num_decoding)):
                if v == math.inf:
                    v, free = (v, free - 1) if free > 0 else (self.alpha(rid), free)
                values.append((v, -i, -n))
        ranked = sorted(values, reverse=True)
        gains = list(itertools.accumulate((0.0 if v == math.inf else v for v, _, _ in ranked), initial=0.0))
        probes = sum(v == math.inf for v, _, _ in ranked)  # those in free rows: first, and in every size
        lowest = next(b for b in buckets if b >= base_tokens + probes)
        sizes = [(lowest, probes)] + [(b, min(b - base_tokens, len(ranked))) for b in buckets
                                      if lowest <= b and b - base_tokens < len(ranked)]
        sizes.append((next(b for b in buckets if b >= base_tokens + len(ranked)), len(ranked)))
        _, keep = max(sizes, key=lambda size: gains[size[1]] * worth - cost(*size))  # ties: the first
        kept = [0] * len(drafts)
        for _, _, n in ranked[:keep]:
            kept[-n] += 1
        return kept

    def draft_values(self, request_id: str, length: int, num_decoding: int) -> list[float]:
        """What each token of a request's draft of `length` tokens is worth, in output tokens
        of the step's batch (fit_to_buckets): position i's chance of being accepted,
        alpha^(i + 1); a probe's token is kept whatever it costs (infinite)."""
        alpha = self.alpha(request_id)
        values = [alpha ** (i + 1) for i in range(length)]
        if values and request_id in self._probing:
            values[0] = math.inf
        return values

    def limit(self, request_id: str, num_decoding: int, max_draft_tokens: int) -> int:
        """Draft tokens for a request (DraftBudget.limit): while alpha^j >= tau (module doc);
        where that grants any and the scheduler fits steps to token buckets (fit_to_buckets),
        at least what that fit keeps of a full draft for this request alone, at the measured
        step costs (on this CPU a batch-1 request accepting 0.3 of its drafts: 3 tokens in a
        4-row step, where tau (0.1) grants 1, in a 2-row step dearer than the 4-row one). The
        step's fit then cuts every draft together. A request tau denies (never raised: the
        step's fit could cut it every step, and it would never be probed) gets a one-token
        probe now and then. The alone-fit assumes a step of decodes only."""
        fit = self._decision_fit(num_decoding, max_draft_tokens)
        if fit is None:
            return self.unfitted_limit(max_draft_tokens, num_decoding)
        tau = _tau(fit, num_decoding)
        alpha = self.alpha(request_id)
        k, p = 0, 1.0
        while k < max_draft_tokens:
            p *= alpha
            if p < tau:
                break
            k += 1
        self._probing.discard(request_id)  # (a probe's value would keep a token in the fit below)
        if self._buckets is not None and 0 < k < max_draft_tokens:  # the step's shapes, this request alone
            k = max(k, self.fit_to_buckets([(request_id, max_draft_tokens)], max(1, num_decoding), self._buckets,
                                           num_decoding)[0])
        st = self._requests.setdefault(request_id, [0.0, 0.0, 0.0])
        if k == 0:
            st[2] += 1
            if st[2] >= self.config.probe_every:  # text may have turned predictable
                st[2] = 0
                self._probing.add(request_id)
                return 1
        else:
            st[2] = 0
        self._probing.discard(request_id)
        return k


_MIN_SHAPE_STEPS = 3
"""Steps of one shape (bucket, program) before its measured median prices it (step_costs)."""


def _program(drafted: bool, decode_only: bool) -> str:
    """The kind of program a step ran (step_costs): "drafts", "decode" or "mixed"."""
    return "drafts" if drafted else "decode" if decode_only else "mixed"

_MIN_COUNTS = 3
"""Distinct token counts a line needs: with two, one count's own cost sets the slope (on a CPU a
step of 2 tokens costs 1.5x one of 1 token and more than one of 3, its 2-row matmuls taking a
slower path), with more the median of the pairwise slopes outvotes one odd count (with
exactly three, only a middle one: the slope is then that between the outer two). Counts count
only where they are min_span from another (_spread_for_a_line)."""


def _tau(fit: tuple[float, float], num_decoding: int) -> float:
    """The share of a plain step of num_decoding decodes that one more token costs (module doc):
    a draft token at depth j pays when alpha^j >= tau."""
    c_base, c_tok = fit
    batch = max(1, num_decoding)
    step = c_base + c_tok * batch
    return c_tok * batch / step if step > 0 else 1.0


def _min_span(up_to: int | None) -> int:
    """The least spread of token counts a line through the steps of at most up_to tokens needs
    (None: the whole window)."""
    return 8 if up_to is None else max(1, up_to // 18)


def _spread_for_a_line(counts: list[int], min_span: int) -> bool:
    """Whether steps of these token counts can give a line: at least _MIN_COUNTS distinct counts
    each at least min_span from another (the pairs the line's slopes come from: _theil_sen)."""
    if not counts:
        return False
    lo, hi = min(counts), max(counts)
    return len({c for c in counts if c - lo >= min_span or hi - c >= min_span}) >= _MIN_COUNTS


def _theil_sen(steps: list[tuple[int, float]], min_steps: int, min_span: int) -> tuple[float, float] | None:
    """(base, slope) of the Theil-Sen line through (tokens, seconds) steps: the median of the
    pairwise slopes between token counts at least min_span apart (each count's median time;
    closer, the noise of two steps' times is the slope: at batch 32 drafted steps of 56-60
    tokens beside plain ones of 32 outvoted the line with their own slopes), the base the
    median intercept (0 at least). None with fewer than min_steps steps, fewer than three token
    counts or counts spanning less than min_span (_spread_for_a_line), or a base clearly below
    zero (a noisy line: a base of 0 prices every token as all of a step)."""
    by_count: dict[int, list[float]] = collections.defaultdict(list)
    for t, sec in steps:
        by_count[t].append(sec)
    points = sorted((t, statistics.median(v)) for t, v in by_count.items())
    if len(steps) < min_steps or not _spread_for_a_line([t for t, _ in points], min_span):
        return None
    slope = max(0.0, statistics.median((y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points)
                                       for x2, y2 in points[i + 1:] if x2 - x1 >= min_span))
    base = statistics.median(y - slope * x for x, y in points)
    return None if base < -0.1 * statistics.median(y for _, y in points) else (max(0.0, base), slope)
