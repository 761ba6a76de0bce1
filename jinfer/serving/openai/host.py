"""Serving an ASGI app with uvicorn on its own thread and event loop.

The socket is bound at construction, so a taken port fails before anything starts and port 0
is known at once (`HttpHost.port`). Stopping is graceful: no new connections, idle ones closed,
requests in flight get `grace` seconds to finish, then their tasks are cancelled (a cancelled
generation aborts its request) and the thread ends.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        return socket.create_server(address, family=family)
    except OSError as e:
        raise RuntimeError(f"cannot listen for HTTP on {host}:{port}: {e}") from None


class HttpHost:
    def __init__(self, app, host: str, port: int, *, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None, name: str = "http"):
        self._socket = _listen(host, port)
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(app, lifespan="off", log_config=None, log_level="warning", access_log=False,
                                ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._failure: BaseException | None = None

    def _run(self) -> None:
        try:  # asyncio.run ends by cancelling what is left and letting it unwind (aborts sent)
            asyncio.run(self._server.serve(sockets=[self._socket]))
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._failure = e

    def start(self, timeout_s: float = 30.0) -> "HttpHost":
        """Returns once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server on port {self.port} did not start: {self._failure!r}")
            time.sleep(0.01)
        return self

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
