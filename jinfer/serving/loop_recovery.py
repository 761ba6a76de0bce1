"""The engine loop's recovery: what happens when the loop itself raises.

A loop that raises (a bug outside any one request: a listener, the engine's books) is restarted:
every stream it served and every queued command fail with EngineUnavailable saying so, the
engine is reset (Engine.reset: no request, every page free, the prefix cache empty; weights and
compiled steps kept) and a new thread takes over; health stays SERVING. Past `max_restarts`
crashes within `restart_window_s` it stays DEAD, so a crash that recurs does not spin. A
KeyboardInterrupt or SystemExit ends it DEAD at once, and a step that never returns (STALLED)
cannot be restarted: the thread is still inside it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

log = logging.getLogger(__name__)


class EngineUnavailable(RuntimeError):
    """The engine loop is dead or wedged, or restarted while the request was in it: it will not
    be served."""


class LoopRecovery:
    """Restarting a crashed loop, or ending it DEAD (jinfer.serving.engine_loop.EngineLoop mixes
    it in): it uses the loop's engine, thread, restart bounds, streams, paused requests, watchers
    and command queue."""

    def _crashed(self, cause: Exception) -> None:
        """The loop raised: restart it on a fresh engine, or end it DEAD past the restart bound."""
        now = time.monotonic()
        while self._restarted_at and now - self._restarted_at[0] > self.restart_window_s:
            self._restarted_at.popleft()
        if len(self._restarted_at) >= self.max_restarts:
            log.exception("engine loop crashed after %d restart(s) within %g s: not restarting it; health "
                          "stays NOT_SERVING until the server is restarted", len(self._restarted_at),
                          self.restart_window_s)
            self._die(cause, f"; it crashed after {len(self._restarted_at)} restart(s) within "
                             f"{self.restart_window_s:g} s, so it was not restarted")
            return
        if not hasattr(self.engine, "reset"):
            log.exception("engine loop crashed and %s cannot be reset: not restarting it",
                          type(self.engine).__name__)
            self._die(cause)
            return
        log.exception("engine loop crashed: failing its requests and restarting it on a fresh engine state")
        try:
            self._restart(cause)
        except Exception as e:  # noqa: BLE001 - the engine would not reset: nothing left to serve with
            log.exception("engine loop could not restart")
            self._die(e)

    def _restart(self, cause: Exception) -> None:
        """Resets the engine, fails what the crashed loop held and starts a new thread (on the
        crashed one, which ends after)."""
        self.engine.reset()  # first: if it raises, the requests hear that the loop stopped
        self._fail_everything(EngineUnavailable(
            f"the engine loop restarted after an internal error ({cause!r}) while this request was in it; "
            "retry it"))
        # The new prefix cache needs its own log; the watchers that knew the old one were ended.
        self._evictions = self.engine.eviction_log(wanted=lambda: bool(self._watchers))
        self._restarted_at.append(time.monotonic())
        self.restarts += 1
        self._guarded(self._tell, "on_restart", type(cause).__name__)
        with self._thread_lock:
            if self._stopped.is_set():
                return
            self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
            self._thread.start()
        log.warning("engine loop restarted on a fresh engine state (%d restart(s) since start)", self.restarts)

    def _die(self, cause: BaseException, why: str = "") -> None:
        """The loop is gone: fail every stream it served and everything still queued."""
        error = EngineUnavailable(f"the engine loop has stopped ({cause!r}){why}")
        with self._dead_lock:
            self._dead = error
        self._fail_everything(error)

    def _fail_everything(self, error: EngineUnavailable) -> None:
        """Fails every stream the loop serves and every queued command with `error`, and ends
        the watch streams. A listener or sink that raises is logged; the rest still hear."""
        sinks, self._sinks = self._sinks, {}
        for request_id in self._paused:  # gone with the engine's state: their resumes find nothing
            self._guarded(self._tell, "on_done", request_id)
        self._paused.clear()
        for request_id, sink in sinks.items():
            self._guarded(self._tell, "on_done", request_id)
            self._guarded(sink, error)
        self._guarded(self.end_watches)
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            self._guarded(self._refuse, cmd, error)

    @staticmethod
    def _guarded(fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - failing the others matters more
            log.exception("engine loop: %s failed while failing requests", getattr(fn, "__name__", fn))
