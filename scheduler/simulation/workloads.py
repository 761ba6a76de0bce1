"""Workloads: what requests arrive when. Shared by the serving benchmark, the router and the
simulator.

A workload is a list of `WorkItem`s ordered by arrival. Prompts are token ids (exact lengths and
exact shared prefixes, whatever the tokenizer) or text (from traces). Generators draw lengths
and ids from a seeded numpy Generator, so a (generator, seed) pair is one fixed workload.

Multi-turn sessions: the items of one `session` are its turns in order; a turn's `prompt` is
only the new user message, and whoever replays it prepends the conversation so far (earlier
prompts and the replies the server actually gave). A turn is sent at its arrival time or when
the previous turn finishes, whichever is later.

Trace files are JSON Lines, one request per line:
    {"arrival_s": 0.25, "prompt_ids": [12, 7, ...], "max_tokens": 64, "tier": "batch", "session": "s3"}
with "prompt" (text) in place of "prompt_ids" if wanted; tier, session and group are optional.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A request pauses for a tool after `after_tokens` output tokens of its current segment
    (the last of them the call), waits pause_s, and resumes with return_tokens tokens."""

    after_tokens: int
    pause_s: float
    return_tokens: int

    def __post_init__(self):
        if self.after_tokens < 1 or self.return_tokens < 0:
            raise ValueError(f"{self}: after_tokens must be >= 1 and return_tokens >= 0")
        if not (self.pause_s >= 0 and math.isfinite(self.pause_s)):
            raise ValueError(f"pause_s={self.pause_s} must be finite and >= 0")


@dataclasses.dataclass(frozen=True)
class WorkItem:
    arrival_s: float
    """Seconds after the start of the run."""
    prompt: tuple[int, ...] | str
    """Token ids, or text for the server to tokenize."""
    max_tokens: int
    """Output tokens to ask for."""
    tier: str = ""
    """SLO tier name; empty: the server's first tier."""
    session: str = ""
    """Multi-turn session id; empty: a single-turn request."""
    group: int = -1
    """Shared-prefix group it was drawn from (-1: none); for analysis only."""
    output: tuple[int, ...] = ()
    """The tokens the model will write, when known (a recorded rollout): the simulator emits
    them and verifies speculative drafts against them; empty: distinct synthetic ids."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Tool calls in order (augmented requests; the simulator pauses and resumes them): its
    output is len(tool_calls) + 1 segments, the last max_tokens long."""

    def __post_init__(self):
        if self.arrival_s < 0 or not math.isfinite(self.arrival_s):
            raise ValueError(f"arrival_s={self.arrival_s} must be finite and >= 0")
        if not self.prompt:
            raise ValueError("prompt is empty")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")

    @property
    def prompt_len(self) -> int | None:
        """Token count, when the prompt is token ids."""
        return None if isinstance(self.prompt, str) else len(self.prompt)


def _lengths(rng, mean: float, spread: float, n: int, lo: int = 1) -> np.ndarray:
    """n lengths uniform in [mean·(1−spread), mean·(1+spread)], at least lo."""
    if mean < lo:
        raise ValueError(f"mean length {mean} must be >= {lo}")
    if not 0 <= spread < 1:
        raise ValueError(f"spread={spread} must be in [0, 1)")
    low, high = max(lo, round(mean * (1 - spread))), max(lo, round(mean * (1 + spread)))
    return rng.integers(low, high + 1, size=n)


def _ids(rng, n: int, vocab: tuple[int, int]) -> tuple[int, ...]:
    return tuple(int(x) for x in rng.integers(vocab[0], vocab[1], size=n))


def _tiers(rng, n: int, tiers: dict[str, float] | None) -> list[str]:
    if not tiers:
        return [""] * n
    names = list(tiers)
    weights = np.array([tiers[t] for t in names], dtype=float)
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"tier weights {tiers} must be >= 0 with a positive sum")
    return [names[i] for i in rng.choice(len(names), size=n, p=weights / weights.sum())]


def zipf_weights(n: int, a: float) -> np.ndarray:
    """Popularity of n items, rank r having weight 1/r^a (a = 0: all equal)."""
    if a < 0:
        raise ValueError(f"zipf exponent a={a} must be >= 0")
    w = 1.0 / np.arange(1, n + 1) ** a
    return w / w.sum()


def random_lengths(num_requests: int, *, input_len: int, output_len: int, spread: float = 0.5,
                   vocab: tuple[int, int], tiers: dict[str, float] | None = None, seed: int = 0
                   ) -> list[WorkItem]:
    """Independent prompts of random ids, lengths uniform within ±spread of the means."""
    rng = np.random.default_rng(seed)
    ins, outs = _lengths(rng, input_len, spread, num_requests), _lengths(rng, output_len, spread, num_requests)
    tier = _tiers(rng, num_requests, tiers)
    return [WorkItem(0.0, _ids(rng, int(i), vocab), int(o), tier[k]) for k, (i, o) in enumerate(zip(ins, outs))]


def shared_prefix(num_requests: int, *, num_groups: int, prefix_len: int, suffix_len: int, output_len: int,
                  zipf_a: float = 1.0, spread: float = 0.5, vocab: tuple[int, int],
                  tiers: dict[str, float] | None = None, seed: int = 0,
                  prefix_spread: float = 0.0) -> list[WorkItem]:
    """Each request = the shared prefix of a group (picked by Zipf(zipf_a) popularity; a=0 is
    even) + its own random suffix. prefix_spread varies prefix lengths across groups."""
    if num_groups < 1:
        raise ValueError(f"num_groups={num_groups} must be >= 1")
    rng = np.random.default_rng(seed)
    prefixes = [_ids(rng, int(n), vocab) for n in _lengths(rng, prefix_len, prefix_spread, num_groups)]
    groups = rng.choice(num_groups, size=num_requests, p=zipf_weights(num_groups, zipf_a))
    sfx, outs = _lengths(rng, suffix_len, spread, num_requests), _lengths(rng, output_len, spread, num_requests)
    tier = _tiers(rng, num_requests, tiers)
    return [WorkItem(0.0, prefixes[g] + _ids(rng, int(s), vocab), int(o), tier[k], group=int(g))
            for k, (g, s, o) in enumerate(zip(groups, sfx, outs))]


def multi_turn(num_sessions: int, *, turns: int, system_len: int, user_len: int, output_len: int,
               spread: float = 0.5, vocab: tuple[int, int], tiers: dict[str, float] | None = None,
               seed: int = 0) -> list[WorkItem]:
    """Conversations: the first turn starts with a session-specific system prompt; later turns
    carry only the new user message (the replayer prepends the conversation so far). Items are
    ordered turn-major (every session's turn 0, then turn 1, ...), so arrivals assigned in order
    put think time between a session's turns."""
    if turns < 1:
        raise ValueError(f"turns={turns} must be >= 1")
    rng = np.random.default_rng(seed)
    tier = _tiers(rng, num_sessions, tiers)
    items = []
    for t in range(turns):
        users = _lengths(rng, user_len, spread, num_sessions)
        outs = _lengths(rng, output_len, spread, num_sessions)
        for s in range(num_sessions):
            prompt = _ids(rng, int(users[s]), vocab)
            if t == 0:
                prompt = _ids(rng, system_len, vocab) + prompt if system_len else prompt
            items.append(WorkItem(0.0, prompt, int(outs[s]), tier[s], session=f"s{s}"))
    return items


def poisson_arrivals(items: list[WorkItem], rate: float, seed: int = 0) -> list[WorkItem]:
    """Arrival times from a Poisson process of `rate` requests/s, in list order; rate = inf:
    everything at 0."""
    if not rate > 0:
        raise ValueError(f"rate={rate} must be > 0 (inf: all at once)")
    if math.isinf(rate):
        return [dataclasses.replace(it, arrival_s=0.0) for it in items]
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=len(items))
    times = np.cumsum(gaps) - gaps[0]  # the first request at 0
    return [dataclasses.replace(it, arrival_s=float(t)) for it, t in zip(items, times)]


def scale_arrivals(items: list[WorkItem], rate: float) -> list[WorkItem]:
    """A trace's arrival times stretched or squeezed to an average of `rate` requests/s."""
    if len(items) < 2 or items[-1].arrival_s == 0:
        return items
    current = (len(items) - 1) / items[-1].arrival_s
    return [dataclasses.replace(it, arrival_s=it.arrival_s * current / rate) for it in items]


def save_trace(items: list[WorkItem], path: str) -> None:
    with open(path, "w") as f:
        for it in items:
            rec = {"arrival_s": it.arrival_s, "max_tokens": it.max_tokens}
            rec["prompt" if isinstance(it.prompt, str) else "prompt_ids"] = (
                it.prompt if isinstance(it.prompt, str) else list(it.prompt))
            for key in ("tier", "session"):
                if getattr(it, key):
                    rec[key] = getattr(it, key)
            if it.group >= 0:
                rec["group"] = it.group
            f.write(json.dumps(rec) + "\n")


_TRACE_KEYS = {"arrival_s", "prompt", "prompt_ids", "max_tokens", "tier", "session", "group"}


def load_trace(path: str) -> list[WorkItem]:
    """Reads a JSONL trace; errors name the line and the field. Sorted by arrival."""
    items = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected an object, got {type(rec).__name__}")
            unknown = sorted(set(rec) - _TRACE_KEYS)
            if unknown:
                raise ValueError(f"{where}: unknown fields {unknown}; known: {sorted(_TRACE_KEYS)}")
            if ("prompt" in rec) == ("prompt_ids" in rec):
                raise ValueError(f"{where}: give exactly one of prompt (text) and prompt_ids")
            prompt = rec.get("prompt")
            if prompt is None:
                ids = rec["prompt_ids"]
                if not isinstance(ids, list) or not all(isinstance(x, int) and x >= 0 for x in ids):
                    raise ValueError(f"{where}: prompt_ids must be a list of non-negative ints")
                prompt = tuple(ids)
            for key in ("arrival_s", "max_tokens"):
                if key not in rec:
                    raise ValueError(f"{where}: missing {key}")
            try:
                items.append(WorkItem(float(rec["arrival_s"]), prompt, int(rec["max_tokens"]),
                                      str(rec.get("tier", "")), str(rec.get("session", "")),
                                      int(rec.get("group", -1))))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{where}: {e}") from None
    if not items:
        raise ValueError(f"{path}: no requests")
    return sorted(items, key=lambda it: it.arrival_s)


def merge(*workloads: list[WorkItem]) -> list[WorkItem]:
    """Several timed workloads as one, ordered by arrival (stable: a session keeps its order)."""
    return sorted((it for w in workloads for it in w), key=lambda it: it.arrival_s)


SLO_CLASSES = {"interactive": (0, 512, 128), "agent": (4096, 512, 256), "batch": (0, 1024, 1024)}
"""slo_mix's request classes: (shared prefix, own prompt, output) mean tokens at a 7B-class
model's scale. interactive: chat turns (tight TTFT and TPOT targets); agent: tool-using agents
whose long context (system prompt, tool specs, history) is one of a few shared prefixes
(medium targets); batch: offline jobs with long outputs (loose targets)."""


def slo_mix(num_requests: int, *, rate: float, mix: dict[str, float] | None = None, scale: float = 1.0,
            num_agents: int = 8, spread: float = 0.5, vocab: tuple[int, int], seed: int = 0) -> list[WorkItem]:
    """A mixed-SLO workload: each request's class (SLO_CLASSES) drawn with `mix` probabilities
    (default interactive 0.5, agent 0.2, batch 0.3) is its tier; arrivals are Poisson at `rate`
    requests/s over all classes. Agent prompts start with one of `num_agents` shared prefixes
    (even popularity). Lengths are uniform within ±spread of the class means divided by
    `scale` (1: thousands of tokens, for the simulator at 7B scale; 12 fits the test model's
    512-token context), prefixes exactly their mean / scale."""
    mix = mix or {"interactive": 0.5, "agent": 0.2, "batch": 0.3}
    unknown = sorted(set(mix) - set(SLO_CLASSES))
    if unknown:
        raise ValueError(f"slo_mix classes {unknown} are unknown; known: {sorted(SLO_CLASSES)}")
    if not scale >= 1:
        raise ValueError(f"scale={scale} must be >= 1 (it divides the class lengths)")
    if num_agents < 1:
        raise ValueError(f"num_agents={num_agents} must be >= 1")
    rng = np.random.default_rng(seed)
    shape = {name: tuple(max(1, round(n / scale)) if n else 0 for n in SLO_CLASSES[name]) for name in mix}
    prefix_len = shape.get("agent", (0,))[0]
    prefixes = [_ids(rng, prefix_len, vocab) for _ in range(num_agents)] if prefix_len else []
    items = []
    for name in _tiers(rng, num_requests, mix):
        prefix, own, out = shape[name]
        group = int(rng.integers(num_agents)) if prefix else -1
        prompt = (prefixes[group] if prefix else ()) + _ids(rng, int(_lengths(rng, own, spread, 1)[0]), vocab)
        items.append(WorkItem(0.0, prompt, int(_lengths(rng, out, spread, 1)[0]), name, group=group))
    return poisson_arrivals(items, rate, seed)


def demo(vocab: tuple[int, int], seed: int = 0, scale: int = 1, rate: float = 1.0) -> list[WorkItem]:
    """The short built-in workload of `make demo`: interactive requests sharing 4 system-prompt
    prefixes (Zipf 1.0) at 5 req/s, mixed with longer batch requests at 1.5 req/s. scale
    multiplies the request counts, rate the arrival rates."""
    interactive = shared_prefix(32 * scale, num_groups=4, prefix_len=128, suffix_len=16, output_len=24,
                                vocab=vocab, tiers={"interactive": 1}, seed=seed)
    batch = random_lengths(12 * scale, input_len=192, output_len=64, vocab=vocab, tiers={"batch": 1}, seed=seed + 1)
    return merge(poisson_arrivals(interactive, 5.0 * rate, seed), poisson_arrivals(batch, 1.5 * rate, seed + 1))
