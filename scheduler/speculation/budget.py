"""How much to speculate: a draft budget from a step-cost model and each request's acceptance.

A draft token costs its step's compute whether or not it is accepted. With B requests decoding,
a step costs t(B) = c_base + c_tok * B and yields B tokens, so a token is worth t(B) / B of
time; one more draft token adds c_tok and yields, at draft depth j, alpha^j expected tokens
(alpha: the request's chance that a draft token is accepted, given its parent was). It pays
when alpha^j * t(B) / B >= c_tok, i.e. alpha^j >= tau = c_tok * B / t(B). So at batch 1 on a
machine where a step's fixed cost dominates, tau is small and drafts run long; at a large batch
where every token costs compute, tau nears 1 and only near-certain drafts survive.

Whether to draft at all is measured rather than modelled: per batch-size class the budget
compares the output tokens per second of steps with drafts and without (which pipeline, as
plain decoding does) and keeps the better, re-trying the other now and then.

c_base and c_tok are fitted online (a robust line through recent synchronous steps' token
counts and wall times; steps that compiled are not reported), so the budget follows the machine it runs on, CPU or GPU. alpha is estimated
per request (accepted tokens / (accepted + rejections), with the pool of all requests as a
prior), so a request whose text the drafter predicts keeps long drafts and one it does not
stops drafting, probing with one token now and then in case its text turns repetitive.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics


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
    """Steps (with at least two token counts) before the cost model is trusted; until then drafts are allowed."""
    arm_samples: int = 6
    """Steps each way (with drafts, without) per batch-size class before their throughputs are compared."""
    explore_every: int = 64
    """After this many steps of the better way, the other gets explore_len steps (the machine,
    the text, the batch may have changed)."""
    explore_len: int = 6
    ema: float = 0.2
    """Weight of the newest step in each way's throughput average."""

    def __post_init__(self):
        if self.window < 2 or self.min_steps < 2 or self.prior_weight < 0 or self.probe_every < 1:
            raise ValueError(f"{self}: need window >= 2, min_steps >= 2, prior_weight >= 0, probe_every >= 1")
        if self.arm_samples < 1 or self.explore_every < 1 or self.explore_len < 1 or not 0 < self.ema <= 1:
            raise ValueError(f"{self}: need arm_samples, explore_every, explore_len >= 1 and ema in (0, 1]")


class CostAwareBudget:
    """jinfer.speculation.DraftBudget: draft tokens only while they are expected to pay."""

    def __init__(self, config: BudgetConfig = BudgetConfig()):
        self.config = config
        self._steps: collections.deque[tuple[int, float]] = collections.deque(maxlen=config.window)
        self._fit: tuple[float, float] | None = None
        self._stale = False
        # batch-size class -> {drafted: [tokens/s average, steps]}; the class of the last ask
        self._arms: dict[int, dict[bool, list[float]]] = collections.defaultdict(
            lambda: {False: [0.0, 0], True: [0.0, 0]})
        self._calls: collections.Counter = collections.Counter()
        self._arm_key = 1
        self._requests: dict[str, list[float]] = {}  # id -> [accepted, rejections, steps since a draft]
        self._pool = [1.0, 1.0]  # accepted, rejections over every request (a uniform prior)

    @classmethod
    def from_config(cls, spec) -> "CostAwareBudget":
        """From the launch config's speculation section (entrypoints.build.build_draft_budget)."""
        return cls()

    # -- the cost model --------------------------------------------------------------------

    def observe_step(self, num_tokens: int, seconds: float, emitted: int = 0, drafted: bool = True) -> None:
        if drafted:  # the cost model is of steps that carry drafts (synchronous ones)
            self._steps.append((num_tokens, seconds))
            self._stale = True
        if seconds > 0:
            arm = self._arms[self._arm_key][drafted]
            rate = emitted / seconds
            arm[0] = rate if arm[1] == 0 else (1 - self.config.ema) * arm[0] + self.config.ema * rate
            arm[1] += 1

    # -- drafts at all? ------------------------------------------------------------------------

    def wants_drafts(self, num_decoding: int) -> bool:
        """Per batch-size class (powers of two), the way (drafts or none) whose measured output
        tokens per second is higher, each tried until it has arm_samples steps and the loser
        again for explore_len steps after every explore_every. This catches costs the cost
        model cannot see: the pipelining a step without drafts keeps, kernel shapes, host work."""
        key = 1 << max(0, num_decoding - 1).bit_length()
        self._arm_key = key
        arms = self._arms[key]
        plain, draft = arms[False], arms[True]
        if draft[1] < self.config.arm_samples or plain[1] < self.config.arm_samples:
            return draft[1] <= plain[1]
        best = draft[0] >= plain[0]
        self._calls[key] += 1
        period = self.config.explore_every + self.config.explore_len
        return best if self._calls[key] % period < self.config.explore_every else not best

    def cost_model(self) -> tuple[float, float] | None:
        """(c_base, c_tok) in seconds, or None until enough varied steps were seen. Fitted by
        Theil-Sen (the median of pairwise slopes over distinct token counts), so one slow step
        (a stray compile, a busy machine) does not move it; the last fit stays while the window
        holds a single token count."""
        if getattr(self, "_stale", False) and len(self._steps) >= self.config.min_steps:
            self._stale = False
            by_count: dict[int, list[float]] = collections.defaultdict(list)
            for t, sec in self._steps:
                by_count[t].append(sec)
            points = sorted((t, statistics.median(v)) for t, v in by_count.items())
            slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points) for x2, y2 in points[i + 1:]]
            if slopes:
                slope = max(0.0, statistics.median(slopes))
                base = statistics.median(y - slope * x for x, y in points)
                self._fit = (max(0.0, base), slope)
        return self._fit

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

    # -- the decision ----------------------------------------------------------------------

    def limit(self, request_id: str, num_decoding: int, max_draft_tokens: int) -> int:
        fit = self.cost_model()
        if fit is None:
            return max_draft_tokens  # no cost model yet: let drafts run (and teach it)
        c_base, c_tok = fit
        batch = max(1, num_decoding)
        step = c_base + c_tok * batch
        tau = c_tok * batch / step if step > 0 else 1.0
        alpha = self.alpha(request_id)
        k, p = 0, 1.0
        while k < max_draft_tokens:
            p *= alpha
            if p < tau:
                break
            k += 1
        st = self._requests.setdefault(request_id, [0.0, 0.0, 0.0])
        if k == 0:
            st[2] += 1
            if st[2] >= self.config.probe_every:  # text may have turned predictable
                st[2] = 0
                return 1
        else:
            st[2] = 0
        return k
