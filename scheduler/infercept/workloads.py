"""Augmented-LLM workloads: requests that pause for tools, with InferCept's six augment types.

Per type (InferCept, ICML'24, Table 1): the mean pause (s), the mean calls per request and the
mean context (tokens) a request reaches. A request of a type draws its number of calls
(Poisson with the type's mean, at least one), each pause (exponential with the type's mean),
its prompt (a quarter of the context) and the output and tool tokens of each segment so that
its context ends near the type's mean. `scale` divides every length and `pause_scale`
multiplies every pause (what a CPU serves is far less than an H100). Arrivals are Poisson.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from scheduler.simulation.workloads import ToolCall, WorkItem


@dataclasses.dataclass(frozen=True)
class AugmentType:
    name: str
    pause_s: float  # mean pause per call
    calls: float  # mean calls per request
    context: int  # mean context tokens a request reaches


AUGMENTS = {a.name: a for a in (
    AugmentType("math", 1e-4, 3.75, 1422),
    AugmentType("qa", 0.69, 2.52, 1846),
    AugmentType("virtual-env", 0.09, 28.18, 2185),
    AugmentType("chatbot", 28.6, 4.45, 753),
    AugmentType("image", 20.03, 6.91, 1247),
    AugmentType("tts", 17.24, 6.91, 1251),
)}
"""InferCept's Table 1 (mean pause s / calls per request / context tokens)."""


def augmented(n: int, rate: float, types: tuple[str, ...] = tuple(AUGMENTS), scale: float = 1.0,
              pause_scale: float = 1.0, vocab: tuple[int, int] = (10, 30_000), seed: int = 0) -> list[WorkItem]:
    """n requests, types drawn evenly from `types`, Poisson arrivals at `rate` per second."""
    unknown = sorted(set(types) - set(AUGMENTS))
    if unknown:
        raise ValueError(f"unknown augment types {unknown}; known: {sorted(AUGMENTS)}")
    if rate <= 0 or scale < 1 or pause_scale < 0:
        raise ValueError(f"rate={rate} must be > 0, scale={scale} >= 1, pause_scale={pause_scale} >= 0")
    rng = np.random.default_rng(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.exponential(1 / rate)
        kind = AUGMENTS[types[int(rng.integers(len(types)))]]
        calls = max(1, int(rng.poisson(kind.calls)))
        context = max(8 * (calls + 1), int(rng.normal(kind.context, kind.context / 4)) // int(scale))
        prompt_len = max(1, context // 4)
        per_segment = max(2, (context - prompt_len) // (2 * calls + 1))  # output and tool parts alike
        segs = [ToolCall(int(rng.integers(per_segment // 2, per_segment + 1)) or 1,
                         float(rng.exponential(kind.pause_s)) * pause_scale,
                         int(rng.integers(per_segment // 2, per_segment + 1)))
                for _ in range(calls)]
        out.append(WorkItem(t, tuple(int(x) for x in rng.integers(vocab[0], vocab[1], prompt_len)),
                            int(rng.integers(per_segment // 2, per_segment + 1)) or 1, tier="", group=-1,
                            tool_calls=tuple(segs)))
    return out
