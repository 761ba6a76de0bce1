"""Per-request sampling parameters, validated at the boundary."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence

INT32_MAX = 2**31 - 1
"""The step holds integer parameters (top_k, seeds, sample indices) in int32 arrays."""
FLOAT32_MAX = 3.4028234663852886e38
"""...and float ones in float32: a larger temperature would become inf there."""


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
    intercept: tuple[str, ...] = ()
    """Pause (not finish) once the text contains one of these (a tool call's closing markup, e.g.
    "</tool_call>"): the text keeps it; as intercept_token_ids otherwise."""
    intercept_token_ids: tuple[int, ...] = ()
    """Pause (not finish) when one of these is sampled: a tool call. The request keeps its
    place, its K/V kept, swapped to host memory or dropped by the engine's pause policy, until
    Engine.resume appends the tool's tokens (augmented LLMs; InferCept)."""

    def __post_init__(self):
        # Every value the jitted step reads is checked against what its arrays hold (int32,
        # finite float32), so no request can reach a step that fails for everyone in it.
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name}={value!r} must be a number")
            try:
                object.__setattr__(self, name, float(value))
            except OverflowError:  # an integer past float range
                raise ValueError(f"{name}={value} is out of range") from None
        for name in ("top_k", "n", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name}={value!r} must be an integer")
            object.__setattr__(self, name, int(value))
        if not 0 <= self.temperature <= FLOAT32_MAX:
            raise ValueError(f"temperature={self.temperature} must be finite and >= 0, at most {FLOAT32_MAX:.4g} "
                             "(the float32 range the sampler computes in)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1]")
        for name in ("n", "max_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("top_k", "n", "max_tokens"):
            if getattr(self, name) > INT32_MAX:
                raise ValueError(f"{name}={getattr(self, name)} must be < 2**31 (the step holds it in int32)")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
                raise ValueError(f"seed={self.seed!r} must be an integer")
            if not 0 <= self.seed <= INT32_MAX:
                raise ValueError(f"seed={self.seed} must be in [0, 2**31)")
        for name in ("stop_token_ids", "intercept_token_ids"):
            ids = getattr(self, name)
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
                raise ValueError(f"{name}={ids!r} must be a sequence of token ids")
            bad = [i for i, t in enumerate(ids)
                   if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t <= INT32_MAX]
            if bad:
                raise ValueError(f"{name}[{bad[0]}]={ids[bad[0]]!r} must be a token id, an integer in [0, 2**31)")
            object.__setattr__(self, name, tuple(int(t) for t in ids))
        for name in ("stop", "intercept"):
            strings = getattr(self, name)
            if (isinstance(strings, (str, bytes)) or not isinstance(strings, Sequence)
                    or any(not isinstance(s, str) for s in strings)):
                raise ValueError(f"{name}={strings!r} must be a sequence of strings")
            empty = [i for i, s in enumerate(strings) if not s]
            if empty:
                raise ValueError(f"{name}[{empty[0]}] is an empty string: {name} strings must not be empty")
            object.__setattr__(self, name, tuple(strings))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
