"""How the live router (jinfer/router/server.py) listens and talks to its replicas."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How the router listens and talks to its replicas."""

    host: str = "127.0.0.1"
    """Interface to bind (gRPC and HTTP)."""
    port: int = 0
    """0 picks a free port (see RouterServer.port)."""
    http_port: int | None = None
    """The OpenAI-compatible HTTP API (jinfer/serving/openai) on this port of `host`, each request
    routed as a Generate is (0 picks a free one, see RouterServer.http_port); None: no HTTP API."""
    auth_token: str | None = None
    """When set, clients need metadata `authorization: Bearer <token>` (HTTP: the header
    `Authorization: Bearer <token>` on every path but /health)."""
    replica_token: str | None = None
    """Bearer token the router presents to its replicas (their serving.auth_token)."""
    report_interval_s: float = 0.05
    """Replicas report their load at most this often (evictions always at once)."""
    connect_timeout_s: float = 120.0
    """At start, wait this long for every replica to answer (they may still be compiling)."""
    shutdown_grace_s: float = 10.0
    """On stop, in-flight streams get this long to finish."""
    max_message_bytes: int = 64 << 20
    """gRPC message limit, both ways (prompts of long-document workloads are large); also the
    largest HTTP request body."""
    health_interval_s: float = 1.0
    """Every replica's health is checked this often; a down replica is reconnected (watch
    stream, channel backoff) at this pace too."""
    health_timeout_s: float = 1.0
    """Deadline of one health check (a replica that does not answer in time failed it)."""
    health_failures: int = 3
    """Failed health checks in a row that mark a replica down (its watch stream ending, or a
    Generate to it failing with UNAVAILABLE, marks it down at once)."""
    max_reroutes: int = 2
    """A Generate whose replica fails (UNAVAILABLE, or marked down) before anything was relayed
    is routed to another replica at most this many times."""
    max_paused_requests: int = 100_000
    """Requests paused at a tool call whose replica the router remembers for their Resume; past
    this the oldest are forgotten (their replicas abort them after pause_timeout_s anyway)."""

    def __post_init__(self):
        if not 0 < self.report_interval_s <= 3600:
            raise ValueError(f"report_interval_s={self.report_interval_s} must be in (0, 3600]")
        if self.connect_timeout_s <= 0:
            raise ValueError(f"connect_timeout_s={self.connect_timeout_s} must be > 0")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown_grace_s={self.shutdown_grace_s} must be >= 0")
        if not 0 < self.health_interval_s <= 3600:
            raise ValueError(f"health_interval_s={self.health_interval_s} must be in (0, 3600]")
        if self.health_timeout_s <= 0:
            raise ValueError(f"health_timeout_s={self.health_timeout_s} must be > 0")
        if self.health_failures < 1:
            raise ValueError(f"health_failures={self.health_failures} must be >= 1")
        if self.max_reroutes < 0:
            raise ValueError(f"max_reroutes={self.max_reroutes} must be >= 0")
        if self.max_paused_requests < 1:
            raise ValueError(f"max_paused_requests={self.max_paused_requests} must be >= 1")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port={self.http_port} must be in [0, 65535] or None")
        if self.http_port and self.http_port == self.port:
            raise ValueError(f"http_port={self.http_port} is the gRPC port: give them different ports")
