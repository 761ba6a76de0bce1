"""Request state and the outputs the engine hands back."""

from __future__ import annotations

import dataclasses
import enum

from jinfer.config import Tier
from jinfer.sampling_params import SamplingParams
from jinfer.speculation import Draft


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"  # sampled an intercept token: waits for Engine.resume (its tool's output)
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)  # identity: the scheduler's lists find a request by `is`, not by its fields
class Request:
    """One sequence being generated. Only the scheduler and engine touch it; the runner never."""

    request_id: str  # unique per sample: "<id>" for the first, "<id>/<i>" for the others
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # params.seed, or one drawn at admission
    arrival_time: float
    arrival_index: int  # FCFS tie-break
    output_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[float] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V sit in (or are being written to) its pages; with
    # drafts in flight, counting a step in flight's whole draft until that step is read
    num_pending: int = 0  # tokens sampled by dispatched steps whose ids the host has not read yet
    tentative: list[Draft] = dataclasses.field(default_factory=list)
    """Drafts of dispatched steps not yet read, oldest first: their tokens planned as if all accepted
    (drafts in flight; Scheduler.drafts_in_flight), until the step that verifies them is settled."""
    num_tentative: int = 0  # tokens in `tentative`
    pages: list[int] = dataclasses.field(default_factory=list)
    cache_node: object = None  # deepest prefix-cache node this request holds a lock on
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    num_preemptions: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    priority: int = 0  # policy hint (SLO tier etc.); lower runs first
    tier: Tier | None = None  # its SLO tier's targets (None: no targets; policies judge by it)
    sample_group: int = 0  # which of the prompt's n samples this is (keys its random stream)
    policy_state: object = None  # owned by the scheduling policy (e.g. its ordering key)
    num_draft_tokens: int = 0  # speculation: draft tokens verified for this request
    num_accepted_tokens: int = 0  # of them, accepted
    num_spec_steps: int = 0  # steps that verified a draft for it
    pause: object = None  # jinfer.pausing.Pause while paused, or resumed from a swap not yet back
    intercept_after: int | None = None  # pause once this segment has this many output tokens (trace replay)
    followers: list["Request"] = dataclasses.field(default_factory=list)
    """The prompt's other samples: held until this one has computed the shared prompt pages."""
    text: object = None  # its jinfer.detokenizer.IncrementalDetokenizer (stop and intercept strings); None: tokens only

    @property
    def num_tokens(self) -> int:
        """Target: every prompt and output token (pending and tentative ones too) computed before
        the next sample."""
        return len(self.prompt_ids) + len(self.output_ids) + self.num_tentative + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        """Output tokens read, tentative and pending: the next sample's index, if every draft in
        flight is accepted."""
        return len(self.output_ids) + self.num_tentative + self.num_pending

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def ids(self, start: int, stop: int) -> list[int]:
        """all_ids[start:stop] without building all_ids (a decode step needs one token)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p:stop - p]
        if stop <= p:
            return self.prompt_ids[start:stop]
        return self.prompt_ids[start:] + self.output_ids[:stop - p]


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    draft_tokens: int = 0  # speculation: draft tokens verified
    accepted_draft_tokens: int = 0  # of them, accepted (each one a token without its own step)
    spec_steps: int = 0  # steps that verified a draft


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one sample of a request (deltas), plus its running totals."""

    request_id: str
    index: int  # which of the request's n samples
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[float] | None
    token_ids: list[int]  # all output ids so far
    text: str  # all output text so far (stop string excluded)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None
    usage: Usage
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    paused: bool = False
    """It sampled an intercept token (the last of token_ids) and waits for Engine.resume; the
    resumed request's outputs start a new segment: token_ids and text count from there."""
