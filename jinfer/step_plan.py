"""What a step is, as the scheduler plans it and settles it: each sequence's share (ScheduledSeq),
the plan (StepPlan), what settling gave each request (Settled) and the speculation counters."""

from __future__ import annotations

import dataclasses

from jinfer.request import Request
from jinfer.sampling_params import SamplingParams

PENDING = -1
"""Stands in a plan for a token sampled by the previous step that the host has not read yet;
the runner feeds the real id from device memory."""


@dataclasses.dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step: compute `token_ids` at positions start_pos, start_pos+1, ..."""

    request_id: str
    token_ids: tuple[int, ...]  # may end with PENDING (the previous step's sample)
    start_pos: int
    pages: tuple[int, ...]  # the request's page table after allocation
    sample: bool  # the step reaches the request's last token: sample the next one
    params: SamplingParams
    seed: int
    sample_group: int  # which of the prompt's n samples: keys the random stream with seed
    sample_index: int  # output tokens before this one: keys the per-token random stream
    num_draft: int = 0  # the last num_draft of token_ids are a draft to verify
    draft_parents: tuple[int, ...] = ()  # a tree draft: each draft token's parent (-1: the last
    # known token), as jinfer.speculation.Draft; empty for a chain


@dataclasses.dataclass(frozen=True)
class Settled:
    """One token a step sampled for a running request, as Scheduler.update settled it."""

    index: int  # the sequence's position in the plan (and in the step's outputs)
    req: Request
    tokens: tuple[int, ...]  # appended this step: one, or accepted draft tokens + the model's
    finish_reason: str | None  # "stop" | "length" | None: still running (or paused)
    rows: tuple[int, ...] = (0,)  # per appended token, its sampled row among the sequence's
    paused: bool = False  # it sampled an intercept token: paused, not finished

    @property
    def token(self) -> int:
        return self.tokens[-1]



@dataclasses.dataclass
class SpecStats:
    """Speculation since start, over every request (per request: Request.num_draft_tokens...)."""

    draft_tokens: int = 0  # draft tokens verified
    accepted_tokens: int = 0  # of them, accepted
    spec_steps: int = 0  # (request, step) pairs that verified a draft
    drafter_seconds: float = 0.0  # host time in the drafter (start, propose, observe, finish)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted(self) -> float:
        """Accepted draft tokens per verification."""
        return self.accepted_tokens / self.spec_steps if self.spec_steps else 0.0


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The only thing the runner sees of a step."""

    seqs: tuple[ScheduledSeq, ...]
    preempted: tuple[str, ...] = ()
    swap_out: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """(request id, pages): paused requests' K/V to copy to the host tier before this step runs
    (the pages are already free for the step to reuse)."""
    swap_in: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """(request id, pages): K/V to copy back from the host tier into these pages before this
    step runs (after swap_out's copies)."""

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def num_decoding(self) -> int:
        """Sequences that decode (their one token, plus a draft if any, and sample); the others
        carry prompt chunks."""
        return sum(1 for s in self.seqs if s.sample and len(s.token_ids) == 1 + s.num_draft)
