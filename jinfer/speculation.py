"""Speculative decoding's interface: the Drafter that jinfer calls and scheduler/ implements.

A drafter guesses the next tokens of a request from what it has seen (the request's own prompt
and output, earlier requests' outputs) without a model. The engine verifies a draft in the
same step that decodes the request's next token: every draft position gets logits, the
longest acceptable prefix (greedy: equal to the argmax; sampled: lossless rejection sampling)
is kept plus one token the target model chose, and the rest is rolled back. The output is what
decoding without speculation gives (greedy: the same tokens; sampled: the same distribution).

Drafts are chains or trees. A tree is given by parent indices in topological order: token i's
parent is `parents[i]` (an earlier index), or -1 for the request's last known token (the root).
A chain is the tree whose parents are (-1, 0, 1, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence


@dataclasses.dataclass(frozen=True)
class Draft:
    """A proposal of tokens to follow a request's last token: a chain or a tree."""

    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()
    """parents[i] < i is token i's parent; -1: the root (the request's last known token)."""
    score: float = 0.0
    """The drafter's own estimate of how many tokens will be accepted (for budgets and logs)."""

    def __post_init__(self):
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"a draft of {len(self.tokens)} tokens has {len(self.parents)} parents")
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"draft token {i} has parent {p}: parents must come earlier (or be -1)")

    @classmethod
    def chain(cls, tokens: Sequence[int], score: float = 0.0) -> "Draft":
        tokens = tuple(int(t) for t in tokens)
        return cls(tokens, tuple(range(-1, len(tokens) - 1)), score)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def depths(self) -> list[int]:
        """Each token's depth: 1 for the root's children."""
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out

    def first_chain(self) -> "Draft":
        """The chain from the root through each node's first child (a tree's leading path)."""
        path, node = [], -1
        while True:
            child = next((i for i, p in enumerate(self.parents) if p == node), None)
            if child is None:
                return Draft.chain([self.tokens[i] for i in path], self.score)
            path.append(child)
            node = child

    def below(self, path: Sequence[int]) -> "Draft":
        """The subtree under the node that `path`'s tokens reach from the root (at each node, its
        first child with the next token), that node's children its roots; NO_DRAFT where the
        path leaves the draft."""
        node = -1
        for token in path:
            node = next((i for i in range(node + 1, len(self.tokens))
                         if self.parents[i] == node and self.tokens[i] == token), None)
            if node is None:
                return NO_DRAFT
        index, tokens, parents = {node: -1}, [], []
        for i in range(node + 1, len(self.tokens)):
            if self.parents[i] in index:
                index[i] = len(tokens)
                tokens.append(self.tokens[i])
                parents.append(index[self.parents[i]])
        return Draft(tuple(tokens), tuple(parents), self.score)

    def truncate(self, k: int) -> "Draft":
        """The first k tokens (a prefix in topological order is still a tree)."""
        return self if len(self.tokens) <= k else Draft(self.tokens[:k], self.parents[:k], self.score)

    def depth(self) -> int:
        """Tokens on the longest root-to-leaf path (the most a verification can accept)."""
        return max(self.depths(), default=0)


NO_DRAFT = Draft()


def accept(draft: Sequence[int], parents: Sequence[int], sampled: Sequence[int]) -> list[int]:
    """The draft tokens verification keeps: the path from the root that follows, at each node,
    the first child equal to the model's sample there. sampled[0] is the sample after the root
    (the last known token), sampled[i + 1] the sample after draft token i. Returns the path's
    draft indices; the emitted tokens are their tokens, then sampled[path[-1] + 1] (or
    sampled[0] for an empty path): the model's own next token.

    With samples keyed by output index (jinfer.sampling), the emitted tokens are those plain
    decoding emits, greedy or sampled. For a sampled position, a draft token x is kept with
    probability p(x), else the next child is tried with p renormalised without x, and the token
    finally taken comes from p without the rejected ones: the lossless rejection sampling of
    Leviathan et al. for one-hot (model-free) proposals, chains and trees alike.
    """
    path, node = [], -1
    while True:
        want = sampled[node + 1]
        child = next((i for i in range(node + 1, len(draft)) if parents[i] == node and draft[i] == want), None)
        if child is None:
            return path
        path.append(child)
        node = child


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What verifying one sequence's draft gives (verify)."""

    emitted: tuple[int, ...]  # the accepted draft tokens, then the model's own next token
    rows: tuple[int, ...]  # per emitted token, the sampled row (of the sequence's) it came from
    path: tuple[int, ...]  # the accepted draft tokens' indices in the draft
    stopped: bool  # verification stopped at a token the model disagreed with (False: a leaf)


def verify(draft: Sequence[int], parents: Sequence[int], sampled: Sequence[int]) -> Verdict:
    """Settles a draft against the step's samples (sampled as accept takes them): the only
    place a draft is walked; Scheduler.update calls it for the engine and the simulators."""
    path = accept(draft, parents, sampled)
    node = path[-1] if path else -1
    return Verdict(tuple(draft[i] for i in path) + (sampled[node + 1],), (0,) + tuple(1 + i for i in path),
                   tuple(path), any(p == node for p in parents))


class Drafter(Protocol):
    """Proposes drafts for requests and learns from what they generate.

    The engine calls these on its own thread, in this order per request: start, then proposes
    and observes (with drafts in flight, two proposes may come before the observe of the first
    one's step: output_ids is always the tokens read), then finish. A request's samples (n > 1) are separate requests
    here (ids "<id>", "<id>/1", ...). Implementations live in scheduler/ (n-gram, SuffixDecoding,
    DAS).
    """

    def start(self, request_id: str, prompt_ids: Sequence[int]) -> None:
        """A request begins (its prompt is all it has so far)."""

    def propose(self, request_id: str, output_ids: Sequence[int], max_draft_tokens: int) -> Draft:
        """A draft of at most max_draft_tokens tokens to follow prompt + output_ids (NO_DRAFT: none).
        max_draft_tokens: the step's room for this draft (the scheduler passes >= 1), not the
        request's output cap (SamplingParams.max_tokens, already counted in that room). With
        drafts in flight (jinfer/drafting.py) it also covers a step in flight's draft and
        sample, which the scheduler then skips: the room plus that draft's length plus one
        (of a tree's, the scheduler follows its leading chain: jinfer/drafting.py)."""

    def observe(self, request_id: str, new_tokens: Sequence[int]) -> None:
        """Tokens appended to the request's output since the last call (accepted draft tokens
        and the token the model chose)."""

    def finish(self, request_id: str, output_ids: Sequence[int], aborted: bool) -> None:
        """The request ended (its full output); forget per-request state, learn from it."""


class DraftBudget(Protocol):
    """How many draft tokens a request may carry into a step: the cost side of speculation.

    A draft token costs the step its compute whether or not it is accepted; it pays only when
    accepted. The scheduler asks `limit` before it asks the drafter (0: no draft, and no drafter
    call), trims the draft to it, and reports what it learns: each verification and each step's
    size and time. Implementations live in scheduler/ (scheduler/speculation/budget.py).
    """

    def limit(self, request_id: str, num_decoding: int, max_draft_tokens: int) -> int:
        """Draft tokens allowed (<= max_draft_tokens) for a request in a step where num_decoding
        requests decode."""

    def observe_verify(self, request_id: str, accepted: int, rejected: bool) -> None:
        """A verification accepted `accepted` draft tokens, then stopped at a token the model
        disagreed with (rejected) or at the end of the draft (a leaf: not rejected)."""

    def wants_drafts(self, num_decoding: int, *, prefilling: bool = False) -> bool:
        """Whether the next step should carry drafts at all (a step without them pipelines with
        the one before, as plain decoding does; one with them too where drafts are in flight,
        jinfer/drafting.py); num_decoding requests decode in it, and
        with prefilling it also carries prompt chunks."""

    def observe_step(self, num_tokens: int, seconds: float, emitted: int, drafted: bool, *,
                     num_decoding: int = 0, decode_only: bool = False, drafting: bool = False,
                     pipelined: bool | None = None) -> None:
        """A step of num_tokens tokens took `seconds` (from the step before it being read back:
        one pipeline period when steps pipeline), settled `emitted` tokens, and carried drafts
        or not; num_decoding of its sequences decoded, and with decode_only no other sequence
        (a prompt chunk) was in it; drafting: it was planned in drafting mode (wants_drafts
        said so), with or without a draft in it; pipelined: it was dispatched before the step
        ahead of it was read, so its time is one pipeline period (False: its planning, dispatch
        and whole device time; None: unknown)."""

    def lead_limit(self) -> int | None:
        """How many tokens a request may draft ahead of the furthest-behind other running
        request (None: no limit); asked only in a closed batch (Engine.closed_batch) while no
        request waits, and optional (a budget without it has no limit). A closed batch takes
        its slowest request's time: a request that races ahead on its drafts finishes early and
        leaves the slowest ones to run in smaller steps, which cost more per token
        (jinfer/drafting.py)."""

    def fit_to_buckets(self, drafts: Sequence[tuple[str, int]], base_tokens: int, buckets: Sequence[int],
                       num_decoding: int) -> list[int]:
        """Each draft's length (at most its own) in a step of base_tokens tokens without them that
        the runner pads to the next of `buckets` (its compiled step sizes, ascending): drafts is
        (request id, length) in plan order. Optional (a budget without it keeps every draft):
        the draft token that takes a step past a bucket costs all the next bucket's padding
        (jinfer/drafting.py)."""

    def finish(self, request_id: str) -> None:
        """The request ended."""
