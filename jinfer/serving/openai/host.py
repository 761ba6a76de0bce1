"""Serving an ASGI app with uvicorn on its own thread and event loop.

The socket is bound at construction, so a taken port fails before anything starts and port 0
is known at once (`HttpHost.port`). Stopping is graceful: no new connections, idle ones closed,
requests in flight get `grace` seconds to finish, then their tasks are cancelled (a cancelled
generation aborts its request) and the thread ends.

Each accepted connection (`_Connection`, uvicorn's HTTP/1.1 protocol) gets TCP_NODELAY, must
send each request's headers within `header_timeout_s` and its body within `body_timeout_s`
after them, is closed after `keep_alive_timeout_s`
idle between requests, and beyond `max_connections` open ones is answered 503 and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
import time

import h11
import uvicorn
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from jinfer.config import ServingConfig
from jinfer.serving.openai.protocol import ApiError

log = logging.getLogger(__name__)

_DEFAULTS = ServingConfig()
_REFUSAL_LOG_EVERY_S = 10.0


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        return socket.create_server(address, family=family)
    except OSError as e:
        raise RuntimeError(f"cannot listen for HTTP on {host}:{port}: {e}") from None


class _Gate:
    """The connection cap of one host, shared by its connections (all on its event loop)."""

    def __init__(self, max_connections: int):
        self.max_connections = max_connections
        self.admitted = 0
        self._refused, self._logged_at = 0, -_REFUSAL_LOG_EVERY_S

    def admit(self) -> bool:
        if self.admitted < self.max_connections:
            self.admitted += 1
            return True
        self._refused += 1
        now = time.monotonic()
        if now - self._logged_at >= _REFUSAL_LOG_EVERY_S:  # one line per burst, not one per connection
            log.warning("refused %d HTTP connection(s): max_connections=%d are open", self._refused,
                        self.max_connections)
            self._refused, self._logged_at = 0, now
        return False

    def release(self) -> None:
        assert self.admitted > 0
        self.admitted -= 1

    async def refuse(self, scope, receive, send) -> None:
        """The ASGI app of a connection over the cap: 503 to its request, then closed."""
        error = ApiError(503, f"the server has max_connections={self.max_connections} open connections; "
                              "retry later or reuse a connection", code="too_many_connections")
        response = JSONResponse(error.body(), status_code=503, headers={"connection": "close", "retry-after": "1"})
        await response(scope, receive, send)


class _Connection(H11Protocol):
    """uvicorn's HTTP/1.1 connection with what a public server needs around it."""

    def __init__(self, gate: _Gate, header_timeout_s: float, body_timeout_s: float, **kwargs):
        super().__init__(**kwargs)
        self._gate, self._header_timeout_s, self._body_timeout_s = gate, header_timeout_s, body_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._admitted = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and a listener
            # from socket.create_server (so each socket it accepts) says 0. uvicorn writes a
            # response's head and body separately: under Nagle the body waits for the client's
            # delayed ACK of the head, 40 ms on every small response of a kept-alive connection.
            with contextlib.suppress(OSError):  # the peer may be gone already
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._admitted = self._gate.admit()
        if not self._admitted:
            self.app = self._gate.refuse
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        state = self.conn.their_state
        if state is not h11.IDLE:  # its headers are complete (or it is closing)
            self._cancel_header_timer()
        if state is h11.SEND_BODY:  # its body is on the way: it must arrive in time too
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self._body_timeout_s, self._on_body_timeout)
        else:
            self._cancel_body_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()
        if self._admitted:
            self._admitted = False
            self._gate.release()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self._header_timeout_s, self._on_header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _on_body_timeout(self) -> None:
        self._body_timer = None
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            log.debug("closed an HTTP connection from %s: its request body did not arrive within %.3g s",
                      self.client, self._body_timeout_s)
            self.transport.close()  # the request in the app hears a disconnect

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.debug("closed an HTTP connection from %s: no complete request headers within %.3g s",
                      self.client, self._header_timeout_s)
            self.transport.close()


class HttpHost:
    """uvicorn serving `app` on host:port. header_timeout_s: a connection's request headers must
    be complete this long after it opens (or after the next request's first byte);
    body_timeout_s: its body this long after its headers;
    keep_alive_timeout_s: an idle kept-alive connection is closed after this long;
    max_connections: connections beyond this many open ones are answered 503 and closed."""

    def __init__(self, app, host: str, port: int, *, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None, name: str = "http",
                 header_timeout_s: float = _DEFAULTS.http_header_timeout_s,
                 body_timeout_s: float = _DEFAULTS.http_body_timeout_s,
                 keep_alive_timeout_s: float = _DEFAULTS.http_keep_alive_timeout_s,
                 max_connections: int = _DEFAULTS.http_max_connections):
        assert header_timeout_s > 0 and body_timeout_s > 0 and keep_alive_timeout_s > 0 and max_connections >= 1
        self._socket = _listen(host, port)
        self.port: int = self._socket.getsockname()[1]
        self._gate = _Gate(max_connections)
        connection = functools.partial(_Connection, self._gate, header_timeout_s, body_timeout_s)
        # ws="none": every connection stays a _Connection (an upgrade would leave the cap's count)
        config = uvicorn.Config(app, http=connection, ws="none", lifespan="off", log_config=None,
                                log_level="warning", access_log=False, timeout_keep_alive=keep_alive_timeout_s,
                                ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: BaseException | None = None

    @classmethod
    def from_config(cls, app, config: ServingConfig, name: str = "http") -> "HttpHost":
        """`app` on config.host:config.http_port, with its TLS files and connection limits."""
        if config.http_port is None:
            raise ValueError("http_port is None: this config serves no HTTP API")
        return cls(app, config.host, config.http_port, ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key,
                   name=name, header_timeout_s=config.http_header_timeout_s, body_timeout_s=config.http_body_timeout_s,
                   keep_alive_timeout_s=config.http_keep_alive_timeout_s,
                   max_connections=config.http_max_connections)

    def _run(self) -> None:
        try:  # asyncio.run ends by cancelling what is left and letting it unwind (aborts sent)
            asyncio.run(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._failure = e

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._server.serve(sockets=[self._socket])

    def start(self, timeout_s: float = 30.0) -> "HttpHost":
        """Returns once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server on port {self.port} did not start: {self._failure!r}")
            time.sleep(0.01)
        return self

    @property
    def num_connections(self) -> int:
        """Open connections within max_connections (refused ones not counted)."""
        return self._gate.admitted

    def open_sockets(self) -> list:
        """The server's end of every open connection (asyncio's socket views: getsockopt,
        getpeername), read on the server's event loop."""
        async def read():
            return [c.transport.get_extra_info("socket") for c in self._server.server_state.connections]
        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(timeout=30)

    def begin_stop(self, grace: float) -> None:
        """Stops accepting; requests in flight get `grace` seconds (join() waits for the end)."""
        self._server.config.timeout_graceful_shutdown = grace
        self._server.should_exit = True

    def join(self) -> None:
        if self._thread.is_alive():
            self._thread.join()
        else:
            self._socket.close()  # never started

    def stop(self, grace: float) -> None:
        self.begin_stop(grace)
        self.join()
