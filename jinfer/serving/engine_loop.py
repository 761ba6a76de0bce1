"""The engine loop: the one thread that owns an Engine, and the commands other threads send it.

The engine is not thread-safe, so one thread (`EngineLoop`) drives it: between steps it takes
commands (add, abort, watch, reset) from a queue, and it pushes each step's outputs to the sink
of the request's stream. Whatever one command does wrong is logged and the loop serves on; a
step that fails is reported to every waiting stream. The loop also says whether it is alive
(`health()`): a loop whose thread died, or whose step has run past the stall timeout, is not,
and the server turns NOT_SERVING and fails the streams waiting on it.

A loop that raises (a bug outside any one request) is restarted on a reset engine, its streams
and queued commands failed with EngineUnavailable, or past its restart bound ends DEAD
(loop_recovery.py).

Listeners (the server's Goodput ledger, its Prometheus metrics) hear the engine's life on this
thread, each through the hooks it has: on_admit(request_id, tier, n), on_refused(tier, n) (the
policy's admission check said no), on_outputs(outputs) after each step, on_done(request_id)
when a request leaves (finished or aborted), update_engine(engine) after each step (before
its outputs go out) and before the loop waits for work, and on_restart(reason) when the loop
restarts after a crash (reason: the exception's class name).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import enum
import logging
import math
import queue
import threading
import time

from jinfer.config import Tier
from jinfer.errors import StepFailed
from jinfer.sampling_params import SamplingParams
from jinfer.scheduling_policy import AdmissionRefused
from jinfer.serving.loop_commands import Abort, Add, ResetPrefixCache, Resume, Wake, Watch, Watcher
from jinfer.serving.loop_recovery import EngineUnavailable, LoopRecovery

log = logging.getLogger(__name__)

MAX_RESTARTS = 3
"""Restarts a crashed loop gets within any RESTART_WINDOW_S seconds; the crash after them ends it DEAD."""
RESTART_WINDOW_S = 600.0


class Health(enum.Enum):
    SERVING = "serving"
    STALLED = "stalled"  # one step has run past the stall timeout
    DEAD = "dead"  # the loop's thread ended without stop() and was not restarted


class EngineLoop(LoopRecovery):
    """Owns the engine on one thread; other threads talk to it through submit/abort/watch.

    Watchers (routers) get (load dict, evictions) events: on subscribing, after a step that
    evicted prefix-cache pages, after changes at most every `interval` seconds, and whenever
    the loop goes idle with news. Evictions come as jinfer.prefix_cache.EvictionLog entries
    (a leaf and its parents evicted in one step: one (tokens, keep) entry).
    """

    def __init__(self, engine, listeners=(), stall_timeout_s: float = math.inf,
                 max_restarts: int = MAX_RESTARTS, restart_window_s: float = RESTART_WINDOW_S,
                 pause_timeout_s: float = math.inf, max_paused: int = 1024):
        """max_restarts, restart_window_s: a crashed loop restarts unless it has already been
        restarted max_restarts times in the last restart_window_s seconds (0: never restarts).
        pause_timeout_s: a paused request (its stream ended at a tool call) not resumed within
        this is aborted; max_paused: at most this many are kept (the longest-paused is aborted
        to make room)."""
        self.engine = engine
        self.listeners = tuple(listeners)  # Goodput, ServerMetrics; touched only on the engine thread
        self.stall_timeout_s = stall_timeout_s
        self.max_restarts, self.restart_window_s = max_restarts, restart_window_s
        self.restarts = 0  # since start
        self._restarted_at: collections.deque[float] = collections.deque()  # monotonic, within the window
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, callable] = {}
        # Paused request -> monotonic deadline for its resume, in pause order (so in deadline order).
        self._paused: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.pause_timeout_s, self.max_paused = pause_timeout_s, max_paused
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._watchers: list[Watcher] = []
        self._watch_lock = threading.Lock()  # the list; unwatch comes from other threads
        self._dead: EngineUnavailable | None = None  # what everything hears once the thread has ended
        self._dead_lock = threading.Lock()  # orders "is it dead?" + put against death's last drain
        self._thread_lock = threading.Lock()  # orders a restart's new thread against stop()
        self._step_started: float | None = None  # monotonic time the running step began
        # Not yet published; nobody listening: not even the token path of an eviction is built.
        self._evictions = engine.eviction_log(wanted=lambda: bool(self._watchers))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._thread_lock:  # a restart under way now starts no thread, or one joined here
            self._stopped.set()
        self._commands.put(Wake())
        self._thread.join()
        self.engine.stop_warmup(timeout=120)

    @property
    def num_outstanding(self) -> int:
        return len(self._sinks)

    def health(self) -> Health:
        """DEAD once the thread has ended unasked and was not restarted; STALLED while a step
        runs past the timeout."""
        if self._dead is not None:
            return Health.DEAD
        started = self._step_started
        if started is not None and time.monotonic() - started > self.stall_timeout_s:
            return Health.STALLED
        return Health.SERVING

    @property
    def thread(self) -> threading.Thread:
        """The thread driving the engine now (a restart replaces it)."""
        return self._thread

    def is_running(self) -> bool:
        """Whether the loop's thread is alive (started and not stopped or dead)."""
        return self._thread.is_alive()

    def send(self, cmd) -> None:
        """Queues a command (jinfer.serving.loop_commands: what submit, resume, abort, watch
        and reset_prefix_cache send); once the loop is dead, refuses it at once (futures fail,
        sinks hear). Tests race hand-made commands through it."""
        with self._dead_lock:
            if self._dead is None:
                self._commands.put(cmd)
                return
        self._refuse(cmd, self._dead)

    @staticmethod
    def _refuse(cmd, error: EngineUnavailable) -> None:
        match cmd:
            case Add() | ResetPrefixCache() | Resume():
                if cmd.done.set_running_or_notify_cancel():
                    cmd.done.set_exception(error)
            case Watch():
                cmd.watcher.sink(None)

    def submit(self, prompt, params: SamplingParams, request_id: str, priority: int, sink,
               tier: Tier | None = None) -> concurrent.futures.Future:
        """Queues add_request; the future raises the engine's ValueError if it refuses the
        request, AdmissionRefused if the scheduling policy does, or EngineUnavailable. `sink` is called on the engine thread with each RequestOutput, or
        with an Exception (the step failed, or the loop died)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.send(Add(prompt, params, request_id, priority, sink, fut, tier))
        return fut

    def resume(self, request_id: str, tool_output: list[int], sink) -> concurrent.futures.Future:
        """Queues Engine.resume of a paused request, its next outputs to `sink`; the future
        raises KeyError if no request of that id is paused here, the engine's ValueError if the
        tool output does not fit, or EngineUnavailable."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.send(Resume(request_id, list(tool_output), sink, fut))
        return fut

    def abort(self, request_id: str, sink) -> None:
        """Aborts the request `sink` was submitted with (if it is still that stream's)."""
        self.send(Abort(request_id, sink))

    def watch(self, sink, interval: float) -> Watcher:
        """Subscribes `sink` (called on the engine thread with (load, evictions), or None when
        the loop ends the stream); returns the handle unwatch takes."""
        w = Watcher(sink, interval)
        self.send(Watch(w))
        return w

    def unwatch(self, watcher: Watcher) -> None:
        with self._watch_lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    def end_watches(self) -> None:
        """Ends every watch stream (server shutdown: they would otherwise never finish)."""
        with self._watch_lock:
            watchers, self._watchers = self._watchers, []
        for w in watchers:
            w.sink(None)

    def reset_prefix_cache(self) -> concurrent.futures.Future:
        """Evicts every unlocked prefix-cache page between steps; the future gives the count."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.send(ResetPrefixCache(fut))
        return fut

    def load(self) -> dict:
        """The engine's load now, with the requests this server has outstanding (engine thread)."""
        return {**dataclasses.asdict(self.engine.load()), "outstanding": len(self._sinks)}

    def _tell(self, hook: str, *args) -> None:
        """Calls `hook` on every listener that has it (engine thread)."""
        for listener in self.listeners:
            method = getattr(listener, hook, None)
            if method is not None:
                method(*args)

    def _publish(self, force: bool) -> None:
        """Sends news to watchers: evictions always; a changed load when its interval has
        passed, or at once when `force` (the loop is about to idle)."""
        with self._watch_lock:
            evictions = self._evictions.drain() if self._evictions is not None else []
            if not self._watchers:
                return
            now = time.monotonic()
            load = self.load()
            for w in self._watchers:
                if evictions or (load != w.last_load and (force or now - w.last_time >= w.interval)):
                    w.last_time, w.last_load = now, load
                    w.sink((load, evictions))

    def _handle_safely(self, cmd) -> None:
        """One command; whatever goes wrong with it is logged and the loop serves on."""
        try:
            self._handle(cmd)
        except Exception:  # noqa: BLE001 - the engine thread must outlive any one request
            log.exception("engine loop: command %s failed", type(cmd).__name__)

    def _handle(self, cmd) -> None:
        match cmd:
            case Add():
                if not cmd.done.set_running_or_notify_cancel():
                    return  # the client went away before its request was added: add nothing
                try:
                    self.engine.add_request(cmd.prompt, cmd.params, request_id=cmd.request_id,
                                            priority=cmd.priority, tier=cmd.tier)
                except (ValueError, AdmissionRefused) as e:
                    if isinstance(e, AdmissionRefused):
                        self._tell("on_refused", cmd.tier, cmd.params.n)
                    cmd.done.set_exception(e)
                    return
                self._sinks[cmd.request_id] = cmd.sink
                self._tell("on_admit", cmd.request_id, cmd.tier, cmd.params.n)
                cmd.done.set_result(cmd.request_id)
            case Resume():
                if not cmd.done.set_running_or_notify_cancel():
                    return  # the client went away first: the request stays paused (until its timeout)
                if cmd.request_id not in self._paused:
                    cmd.done.set_exception(KeyError(cmd.request_id))
                    return
                try:
                    self.engine.resume(cmd.request_id, cmd.tool_output)
                except Exception as e:  # noqa: BLE001 - a ValueError is the client's; anything else still answers it
                    cmd.done.set_exception(e)
                    if not isinstance(e, ValueError):
                        raise
                    return
                del self._paused[cmd.request_id]
                self._sinks[cmd.request_id] = cmd.sink
                cmd.done.set_result(cmd.request_id)
            case Abort():
                if self._sinks.get(cmd.request_id) is cmd.sink:
                    del self._sinks[cmd.request_id]
                    self.engine.abort(cmd.request_id)
                    self._tell("on_done", cmd.request_id)
            case Watch():
                w = cmd.watcher
                with self._watch_lock:
                    self._watchers.append(w)
                    w.last_time, w.last_load = time.monotonic(), self.load()
                w.sink((w.last_load, []))
            case ResetPrefixCache():
                if cmd.done.set_running_or_notify_cancel():
                    cmd.done.set_result(self.engine.reset_prefix_cache())
            case Wake():
                pass
            case _:
                raise TypeError(f"unknown engine-loop command {cmd!r}")

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                self._iterate()
        except Exception as e:  # noqa: BLE001 - a bug outside any one request: start over, if allowed
            self._crashed(e)
        except BaseException as e:  # noqa: BLE001 - asked to end (KeyboardInterrupt, SystemExit): not restarted
            log.exception("engine loop died")
            self._die(e)

    def _fail_request(self, request_id: str, error: Exception) -> None:
        """Aborts one request in the engine and ends its stream with `error`."""
        self.engine.abort(request_id)
        self._tell("on_done", request_id)
        sink = self._sinks.pop(request_id, None)
        if sink is not None:
            sink(error)

    def _expire_pauses(self) -> float | None:
        """Aborts paused requests past their deadline (the oldest first, so only those are
        looked at); seconds until the next one's (None: none paused)."""
        now = time.monotonic()
        while self._paused and next(iter(self._paused.values())) <= now:
            self._drop_paused("was paused for longer than pause_timeout_s")
        return next(iter(self._paused.values())) - now if self._paused else None

    def _drop_paused(self, why: str) -> None:
        request_id, _ = self._paused.popitem(last=False)
        log.info("request %s %s: aborted", request_id, why)
        self.engine.abort(request_id)
        self._tell("on_done", request_id)

    def _iterate(self) -> None:
        busy = self.engine.has_unfinished()
        if not busy:  # after a step the gauges were set before its outputs went out
            self._tell("update_engine", self.engine)
        self._publish(force=not busy)
        wait = self._expire_pauses()
        try:  # block for work only when the engine is idle (and until a paused request's deadline)
            cmd = self._commands.get(block=not busy, timeout=None if busy or wait is None else max(wait, 0.0))
            self._handle_safely(cmd)
            while True:
                self._handle_safely(self._commands.get_nowait())
        except queue.Empty:
            pass
        if not self.engine.has_unfinished():
            return
        self._step_started = time.monotonic()
        try:
            outputs = self.engine.step()
        except StepFailed as e:  # the step was rolled back: only the requests it names fail
            log.warning("%s; failing them alone, the others carry on", e)
            for request_id, cause in e.culprits.items():
                self._fail_request(request_id, RuntimeError(
                    f"this request could not be stepped and was removed ({cause!r}); other requests were not affected"))
            return
        except Exception as e:  # noqa: BLE001 - reported to every waiting request
            log.exception("engine step failed")
            for request_id in list(self._sinks):
                self._fail_request(request_id, e)
            return
        finally:
            self._step_started = None
        self._tell("on_outputs", outputs)
        # Gauges follow the step before any client sees its outputs, so a client that has its
        # answer reads metrics that count it.
        self._tell("update_engine", self.engine)
        # A request's stream ends with the last of its outputs that step: samples finishing
        # together are all delivered, and it stops counting as outstanding before that last
        # message goes out.
        last = {out.request_id: i for i, out in enumerate(outputs)}
        for i, out in enumerate(outputs):
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            if last[out.request_id] == i and out.paused:  # its stream ends; Resume opens the next
                del self._sinks[out.request_id]
                while len(self._paused) >= self.max_paused:
                    self._drop_paused(f"was the longest paused of more than max_paused_requests={self.max_paused}")
                self._paused[out.request_id] = time.monotonic() + self.pause_timeout_s
            elif last[out.request_id] == i and not self.engine.is_unfinished(out.request_id):
                del self._sinks[out.request_id]
                self._tell("on_done", out.request_id)
            sink(out)
