"""The commands other threads send the engine loop (engine_loop.py), one dataclass each, and
a watcher's state: what crosses the loop's queue, apart from the loop that handles it."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math

from jinfer.config import Tier
from jinfer.sampling_params import SamplingParams


class Watcher:
    __slots__ = ("sink", "interval", "last_time", "last_load")

    def __init__(self, sink, interval: float):
        self.sink, self.interval = sink, interval
        self.last_time, self.last_load = -math.inf, None


@dataclasses.dataclass(frozen=True)
class Add:
    prompt: object  # str | list[int]
    params: SamplingParams
    request_id: str
    priority: int
    sink: object  # called with each RequestOutput, or with an Exception
    done: concurrent.futures.Future  # the request id, or the engine's ValueError / AdmissionRefused
    tier: Tier | None


@dataclasses.dataclass(frozen=True)
class Resume:
    request_id: str
    tool_output: list[int]  # the tool's tokens, appended to the paused request
    sink: object  # the resumed stream's: called with each RequestOutput, or with an Exception
    done: concurrent.futures.Future  # the request id; KeyError (not paused here) or the engine's ValueError


@dataclasses.dataclass(frozen=True)
class Abort:
    request_id: str
    sink: object  # the stream giving up: a later request that reused the id is not aborted


@dataclasses.dataclass(frozen=True)
class Watch:
    watcher: Watcher


@dataclasses.dataclass(frozen=True)
class ResetPrefixCache:
    done: concurrent.futures.Future  # pages freed


@dataclasses.dataclass(frozen=True)
class Wake:
    """Unblocks an idle loop (stop)."""
