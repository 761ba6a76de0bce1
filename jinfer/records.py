"""One request's latency record, shared by everything that measures requests (the simulator,
the serving benchmark, the adaptive-TP experiments), judged by its tier's targets exactly as
the server judges it (jinfer.config.Tier.met)."""

from __future__ import annotations

import dataclasses
import math

from jinfer.config import Tier


@dataclasses.dataclass
class RequestRecord:
    """One request's times and sizes, as whoever served or sent it saw them (seconds on one
    clock): the simulator, the adaptive-TP experiments, the serving benchmark's client."""

    index: int
    replica: int
    """Where it was routed (-1: nowhere)."""
    arrival_s: float
    """When it reached whoever records it (the benchmark client: when it was sent)."""
    prompt_tokens: int
    output_tokens: int = 0
    cached_tokens: int = 0
    first_token_s: float = math.nan
    finish_s: float = math.nan
    error: str = ""
    tier: str = ""
    """Its SLO tier's name (empty when the simulator has no tiers)."""
    preemptions: int = 0  # times it was preempted (recompute) before it finished
    tool_calls: int = 0  # times it paused for a tool
    tool_s: float = 0.0  # seconds it waited on its tools (paused)
    output_ids: tuple[int, ...] = ()
    """The tokens it was given, for a work item with a recorded output; empty otherwise."""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def normalized_latency_s(self) -> float:
        """End to end minus the time its tools took, per output token (InferCept's metric)."""
        if self.output_tokens < 1:
            return math.nan
        return (self.latency_s - self.tool_s) / self.output_tokens

    @property
    def tpot_s(self) -> float:
        if self.output_tokens < 2:
            return math.nan
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)

    def meets(self, tier: Tier) -> bool:
        """Finished within its tier's targets (Tier.met: the server's own judge)."""
        return self.ok and tier.met(self.ttft_s, self.tpot_s)
