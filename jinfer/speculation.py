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

    def truncate(self, k: int) -> "Draft":
        """The first k tokens (a prefix in topological order is still a tree)."""
        return self if len(self.tokens) <= k else Draft(self.tokens[:k], self.parents[:k], self.score)

    def depth(self) -> int:
        """Tokens on the longest root-to-leaf path (the most a verification can accept)."""
        depths: list[int] = []
        for p in self.parents:
            depths.append(1 if p < 0 else depths[p] + 1)
        return max(depths, default=0)


NO_DRAFT = Draft()


class Drafter(Protocol):
    """Proposes drafts for requests and learns from what they generate.

    The engine calls these on its own thread, in this order per request: start, then any number
    of (propose, observe) pairs, then finish. A request's samples (n > 1) are separate requests
    here (ids "<id>", "<id>/1", ...). Implementations live in scheduler/ (n-gram, SuffixDecoding,
    DAS).
    """

    def start(self, request_id: str, prompt_ids: Sequence[int]) -> None:
        """A request begins (its prompt is all it has so far)."""

    def propose(self, request_id: str, output_ids: Sequence[int], max_tokens: int) -> Draft:
        """A draft of at most max_tokens tokens to follow prompt + output_ids (NO_DRAFT: none)."""

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
    size and time. Implementations live in scheduler/ (scheduler/spec_budget.py).
    """

    def limit(self, request_id: str, num_decoding: int, max_tokens: int) -> int:
        """Draft tokens allowed (<= max_tokens) for a request in a step where num_decoding
        requests decode."""

    def observe_verify(self, request_id: str, drafted: int, accepted: int) -> None:
        """A verification of `drafted` draft tokens (a chain or tree) accepted `accepted`."""

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """A step of num_tokens tokens took seconds (synchronous wall time)."""

    def finish(self, request_id: str) -> None:
        """The request ended."""
