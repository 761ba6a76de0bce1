"""DAS: distribution-aware speculation for RL rollouts (Shao, Srivatsa et al., MLSys 2026).

In RL post-training the rollout phase repeats the same problems every epoch, and its makespan
is set by the few longest generations. DAS drafts from what earlier rollouts of the same
problem wrote, and spends speculation where it shortens the makespan: on the long tail.

- `RolloutDrafter` (a jinfer.speculation.Drafter): one suffix tree per problem over its last
  `window` rollouts, plus each request's own tree over its prompt and output (as
  SuffixDecoding). A request finds its problem by its prompt (the token ids, or a key function
  of them). A finished rollout joins its problem's tree, the oldest beyond the window leaves
  (`finish` costs O(tokens x suffix depth); tools/bench_rollouts.py reports it per rollout).
- `LengthAwareBudget` (a jinfer.speculation.DraftBudget): each request gets a length class
  (short / medium / long) from its problem's rollout lengths, revised upwards as its own output
  grows; the class sets the draft budget (below). Built by `RolloutDrafter.draft_budget`.

Launch config: `speculation.method = "das"` (with `speculation.das_window`); the budget comes
with it when `speculation.adaptive` is on.

## The budget

A step of B decoding requests that carries D draft tokens costs t = c_base + c_tok * (B + D)
(fitted online from the steps' sizes and wall times, as scheduler/speculation/budget.py does). With
per-token acceptance alpha (the request's problem's rate, accepted / (accepted + rejections),
shrunk towards the pool of all problems), a draft of k tokens makes a step emit on average
E(k) = (1 - alpha^(k+1)) / (1 - alpha) tokens of that request.

- short: no draft. A request expected to finish before the tail never sets the makespan, so
  its draft tokens only lengthen everyone's steps.
- medium: the throughput rule of spec_budget.CostAwareBudget: the j-th draft token stays while
  alpha^j >= tau = c_tok * B / t(B) (it is worth its compute in tokens per second).
- long: the makespan rule. The longest rollout needs L / E(k) steps of about t(B) each, and
  its drafts add c_tok for each of their k tokens in each of those steps. Going from k - 1 to
  k draft tokens pays while the steps it saves outweigh the draft tokens it adds:
      t(B) * (1 / E(k-1) - 1 / E(k))  >=  c_tok * (k / E(k) - (k-1) / E(k-1))
  (L cancels). Where c_base dominates, as on a GPU at small and medium batch, this keeps drafts
  long even at modest alpha; on a CPU, where c_tok is most of a step, it keeps them short.

A step's drafts are then fitted to the runner's token buckets as CostAwareBudget does, a long
request's tokens valued B times a medium one's (each accepted one saves the batch a step).

Length classes: a request's expected length is the larger of its problem's median rollout
length (over the window; the median over all problems when it has none) and its output so
far. It is long at or above the `long_quantile` of recent rollout lengths over all problems,
short below the `short_quantile`, medium between; with fewer than `min_history` recorded
rollouts every request is medium.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
from typing import Callable, Hashable, Sequence

from jinfer.config import SpeculationConfig
from scheduler.speculation.budget import BudgetConfig, CostAwareBudget, _tau
from scheduler.speculation.drafters import SuffixConfig, SuffixDrafter, _SuffixRequest, _unknown
from scheduler.speculation.suffix_tree import SuffixTree
from scheduler.speculation.tail_matcher import TailMatcher


@dataclasses.dataclass(frozen=True)
class DasConfig:
    """Knobs of RolloutDrafter and LengthAwareBudget."""

    window: int = 16
    """Rollouts per problem its suffix tree keeps (the paper uses 16 or 32)."""
    suffix: SuffixConfig = SuffixConfig(max_cached_requests=0)
    """Depth, draft length and pruning of the suffix-tree search (its max_cached_requests is
    unused: there is no global tree)."""
    short_quantile: float = 0.5
    """Requests expected shorter than this quantile of recent rollout lengths do not draft."""
    long_quantile: float = 0.8
    """Requests expected at least this long get the makespan rule."""
    min_history: int = 8
    """Recorded rollouts (over all problems) before length classes apply."""
    history: int = 1024
    """Recent rollout lengths (over all problems) the quantiles are taken over."""
    prior_weight: float = 4.0
    """How many verifications' worth the pooled acceptance counts in a problem's estimate."""
    anchor: int = 8
    """Last prompt tokens stored before each rollout in its problem's tree, so a request drafts
    the way earlier rollouts began from its first token on."""

    def __post_init__(self):
        if self.window < 1 or self.anchor < 0:
            raise ValueError(f"window={self.window} must be >= 1 and anchor={self.anchor} >= 0")
        if not 0 <= self.short_quantile <= self.long_quantile <= 1:
            raise ValueError(f"short_quantile={self.short_quantile}, long_quantile={self.long_quantile}: "
                             "need 0 <= short <= long <= 1")
        if self.min_history < 1 or self.history < 1 or self.prior_weight < 0:
            raise ValueError(f"min_history={self.min_history}, history={self.history} must be >= 1 and "
                             f"prior_weight={self.prior_weight} >= 0")


class _Problem:
    __slots__ = ("tree", "window", "lengths", "next_seq")

    def __init__(self, max_depth: int, window: int):
        self.tree = SuffixTree(max_depth)  # removable: rollouts leave as the window slides
        self.window: collections.deque[int] = collections.deque()  # sequence ids, oldest first
        self.lengths: collections.deque[int] = collections.deque(maxlen=window)  # output lengths
        self.next_seq = 0


class RolloutDrafter(SuffixDrafter):
    """jinfer.speculation.Drafter over per-problem rollout histories (see the module doc):
    SuffixDrafter's per-request trees and search, with its request's problem tree in place of
    the global tree."""

    def __init__(self, config: DasConfig = DasConfig(),
                 problem_key: Callable[[tuple[int, ...]], Hashable] | None = None):
        """problem_key: the problem of a prompt (its token ids); default: the ids themselves,
        so the samples of one prompt, and the same prompt in later epochs, share a tree."""
        super().__init__(config.suffix)
        self.config = config
        self.problem_key = problem_key or (lambda ids: ids)
        self.problems: dict[Hashable, _Problem] = {}
        self._problem_of: dict[str, Hashable] = {}
        self._anchor: dict[str, list[int]] = {}
        self.recent_lengths: collections.deque[int] = collections.deque(maxlen=config.history)

    @classmethod
    def from_config(cls, spec: SpeculationConfig) -> "RolloutDrafter":
        """From the launch config's speculation section (entrypoints.build.build_drafter)."""
        return cls(DasConfig(window=spec.das_window, suffix=SuffixConfig(
            max_depth=spec.suffix_max_depth, max_cached_requests=0,
            max_spec_factor=spec.suffix_max_spec_factor, max_spec_offset=spec.suffix_max_spec_offset,
            min_token_prob=spec.suffix_min_token_prob, tree=spec.tree)))

    def draft_budget(self, spec: SpeculationConfig | None = None) -> "LengthAwareBudget":
        """The budget that goes with this drafter (entrypoints.build.build_draft_budget)."""
        return LengthAwareBudget(self, BudgetConfig(max_lead=spec.max_lead or None) if spec else BudgetConfig())

    # -- what the budget asks --------------------------------------------------------------

    def problem(self, request_id: str) -> Hashable:
        return self._problem_of[request_id]

    def output_len(self, request_id: str) -> int:
        st = self._requests.get(request_id)
        return st.progress.taken if st is not None else 0

    def problem_lengths(self, key: Hashable) -> Sequence[int]:
        p = self.problems.get(key)
        return p.lengths if p is not None else ()

    # -- Drafter ---------------------------------------------------------------------------

    def start(self, request_id: str, prompt_ids: Sequence[int]) -> None:
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already started")
        prompt = tuple(int(t) for t in prompt_ids)
        key = self.problem_key(prompt)
        problem = self.problems.get(key)
        if problem is None:
            problem = self.problems[key] = _Problem(self.config.suffix.max_depth, self.config.window)
        own = SuffixTree(self.config.suffix.max_depth, removable=False)
        own.extend(0, prompt)
        # The problem's tree holds rollouts, each after its prompt's last `anchor` tokens: the
        # request's tail (its prompt's end at first) is matched there from the start.
        self._requests[request_id] = _SuffixRequest(own, TailMatcher(problem.tree, own.sequence(0)))
        self._problem_of[request_id] = key
        self._anchor[request_id] = list(prompt[len(prompt) - self.config.anchor:]) if self.config.anchor else []

    def _shared_tree(self, request_id: str) -> SuffixTree:
        return self.problems[self._problem_of[request_id]].tree

    def finish(self, request_id: str, output_ids: Sequence[int], aborted: bool) -> None:
        """The rollout joins its problem's window (an aborted one's output too: the model wrote
        it), the oldest beyond `window` leaves; its length joins the length statistics unless
        it was aborted (a cut-short length would skew them)."""
        if self._requests.pop(request_id, None) is None:
            raise _unknown(request_id)
        problem = self.problems[self._problem_of.pop(request_id)]
        anchor = self._anchor.pop(request_id)
        if not aborted:
            problem.lengths.append(len(output_ids))
            self.recent_lengths.append(len(output_ids))
        if not output_ids:
            return
        seq_id, problem.next_seq = problem.next_seq, problem.next_seq + 1
        problem.tree.extend(seq_id, anchor + [int(t) for t in output_ids])
        problem.window.append(seq_id)
        while len(problem.window) > self.config.window:
            problem.tree.remove(problem.window.popleft())


SHORT, MEDIUM, LONG = "short", "medium", "long"


def expected_tokens(alpha: float, k: int) -> float:
    """E(k): tokens a step emits for a request carrying a k-token chain, acceptance alpha."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def makespan_draft_len(alpha: float, c_base: float, c_tok: float, batch: int, max_draft_tokens: int) -> int:
    """The long class's draft length: the largest k (<= max_draft_tokens) such that every step from
    0 to k satisfies t(B) * (1/E(j-1) - 1/E(j)) >= c_tok * (j/E(j) - (j-1)/E(j-1))."""
    step = c_base + c_tok * batch
    k = 0
    while k < max_draft_tokens:
        prev, nxt = expected_tokens(alpha, k), expected_tokens(alpha, k + 1)
        saved = step * (1.0 / prev - 1.0 / nxt)
        added = c_tok * ((k + 1) / nxt - k / prev)
        if saved < added:
            break
        k += 1
    return k


def throughput_draft_len(alpha: float, c_base: float, c_tok: float, batch: int, max_draft_tokens: int) -> int:
    """The medium class's draft length: the largest k with alpha^k >= c_tok * B / t(B)."""
    tau = _tau((c_base, c_tok), batch)
    k, p = 0, 1.0
    while k < max_draft_tokens:
        p *= alpha
        if p < tau:
            break
        k += 1
    return k


class LengthAwareBudget(CostAwareBudget):
    """jinfer.speculation.DraftBudget of DAS: a draft length per length class (module doc).

    The step-cost model (c_base, c_tok) is CostAwareBudget's online fit. Acceptance is kept per
    problem. Whether a step is planned in drafting mode at all stays CostAwareBudget's measured
    choice per batch-size class (the output tokens per second of steps in drafting mode and of
    plain ones): the cost model cannot see what a drafted step loses by not pipelining with the
    one before, which on a CPU can outweigh what the drafts save.
    """

    def __init__(self, drafter: RolloutDrafter, config: BudgetConfig = BudgetConfig()):
        super().__init__(config)
        self.drafter = drafter
        self._by_problem: dict[Hashable, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
        self.class_counts: collections.Counter = collections.Counter()
        """Draft-length decisions per class (for reports)."""

    def length_class(self, request_id: str) -> str:
        cfg = self.drafter.config
        recent = self.drafter.recent_lengths
        if len(recent) < cfg.min_history:
            return MEDIUM
        ordered = sorted(recent)
        q = lambda f: ordered[min(len(ordered) - 1, int(f * len(ordered)))]
        lengths = self.drafter.problem_lengths(self.drafter.problem(request_id))
        typical = statistics.median(lengths) if lengths else statistics.median(ordered)
        expected = max(typical, self.drafter.output_len(request_id))
        if expected >= q(cfg.long_quantile):
            return LONG
        return SHORT if expected < q(cfg.short_quantile) else MEDIUM

    def alpha(self, request_id: str) -> float:
        """The request's problem's acceptance rate, shrunk towards the pool of all problems."""
        pool_acc, pool_rej = self._pool
        w = self.drafter.config.prior_weight
        prior = pool_acc / (pool_acc + pool_rej)
        acc, rej = self._by_problem.get(self.drafter.problem(request_id), (0.0, 0.0))
        return (acc + w * prior) / (acc + rej + w)

    def observe_verify(self, request_id: str, accepted: int, rejected: bool) -> None:
        super().observe_verify(request_id, accepted, rejected)
        if request_id in self.drafter:
            st = self._by_problem[self.drafter.problem(request_id)]
            st[0] += accepted
            st[1] += rejected

    def lead_limit(self) -> int | None:
        """None: the length classes already keep drafts to the requests that set the makespan
        (by expected length, where the lead limit has only tokens left to max_tokens)."""
        return None

    def draft_values(self, request_id: str, length: int, num_decoding: int) -> list[float]:
        """In fitting a step to its token bucket (CostAwareBudget.fit_to_buckets): a long
        request's accepted draft token shortens the makespan by one step of the whole batch,
        so it is worth num_decoding medium ones (a medium request's token is a 1/B share of a
        step, as the throughput rule prices it)."""
        values = super().draft_values(request_id, length, num_decoding)
        if values and self.length_class(request_id) == LONG:
            values = [v * max(1, num_decoding) for v in values]
        return values

    def limit(self, request_id: str, num_decoding: int, max_draft_tokens: int) -> int:
        if request_id not in self.drafter:
            return 0
        cls = self.length_class(request_id)
        self.class_counts[cls] += 1
        if cls == SHORT:
            return 0
        fit = self._decision_fit(num_decoding, max_draft_tokens)
        if fit is None:
            return self.unfitted_limit(max_draft_tokens, num_decoding)
        rule = makespan_draft_len if cls == LONG else throughput_draft_len
        return rule(self.alpha(request_id), fit[0], fit[1], max(1, num_decoding), max_draft_tokens)

