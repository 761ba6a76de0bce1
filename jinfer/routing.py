"""The interface between the live router's relay (jinfer/router/) and a routing policy (the
policies live in scheduler/routing/policies.py): what a request looks like to a router, what a replica
reports about itself, and the calls a router answers.

A router sees each request once (`route`) and hears back from replicas: the first token, the
finish, evictions and load reports, and when a replica stops or starts answering again. The
simulator and the live router drive the same objects.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class RouteRequest:
    request_id: str
    prompt: tuple[int, ...]
    max_tokens: int


@dataclasses.dataclass(frozen=True)
class ReplicaLoad:
    """What a replica reports about itself (the live replicas' WatchReplica stream; the
    simulator after every step)."""

    waiting: int
    running: int
    num_pages: int
    free_pages: int
    cached_pages: int
    page_size: int
    outstanding: int = 0

    @property
    def free_tokens(self) -> int:
        return self.free_pages * self.page_size


class NoReplicaUp(RuntimeError):
    """Every replica is down: a request has nowhere to go."""


class Router(Protocol):
    """A routing policy. It may also have `describe() -> dict`: its tuning options as data,
    which the live router reports in GetServerInfo."""

    name: str

    def route(self, req: RouteRequest, now: float) -> int:
        """The replica (index) the request goes to; never one that is down (NoReplicaUp when all
        are). ValueError when the request cannot be routed at all."""

    def on_first_token(self, replica: int, req: RouteRequest, now: float, ttft_s: float) -> None: ...

    def on_finish(self, replica: int, req: RouteRequest, now: float) -> None: ...

    def on_evict(self, replica: int, tokens, keep: int) -> None: ...

    def on_load(self, replica: int, load: ReplicaLoad, now: float) -> None: ...

    def on_replica_down(self, replica: int, now: float) -> None:
        """The replica stopped answering: never route there until on_replica_up; drop its tree
        entries, load history and outstanding count (the caller sends no on_finish for the
        requests routed there before)."""

    def on_replica_up(self, replica: int, now: float) -> None:
        """The replica answers again: route to it again, cold (nothing cached; its load from
        its next report)."""

    def add_replica(self) -> int:
        """A replica joins while routing (a cluster grew): it starts down (on_replica_up brings it
        in, cold); returns its index, the next unused one (indices are never reused: a removed
        replica stays down)."""
