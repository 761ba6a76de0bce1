"""Per-request sampling parameters, validated at the boundary."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it stops."""

    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability sums to >= top_p."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p × the most likely one."""
    seed: int | None = None
    """Same seed -> same tokens, whatever else is in the batch; None draws one."""
    max_tokens: int = 16
    """Tokens to generate at most."""
    stop_token_ids: tuple[int, ...] = ()
    """Finish when one of these is sampled (in addition to the model's EOS)."""
    stop: tuple[str, ...] = ()
    """Finish when the text contains one of these; the text stops before it."""
    ignore_eos: bool = False
    """Keep generating past the model's EOS ids."""
    logprobs: bool = False
    """Return the log-probability of each sampled token."""
    n: int = 1
    """Independent samples of the prompt; they share the prompt's KV pages."""
    speculate: bool = True
    """Let the engine's drafter (if it has one) speculate for this request; False opts out."""

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature={self.temperature} must be finite and >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1]")
        if self.n <= 0:
            raise ValueError(f"n={self.n} must be > 0")
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens={self.max_tokens} must be > 0")
        if self.seed is not None and not 0 <= self.seed < 2**31:
            raise ValueError(f"seed={self.seed} must be in [0, 2**31)")
        empty = [i for i, s in enumerate(self.stop) if not s]
        if empty:
            raise ValueError(f"stop[{empty[0]}] is an empty string: stop strings must not be empty")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
