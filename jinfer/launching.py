"""Launching a step's program and reading its samples back: a mixin of jinfer.runner.ModelRunner.

A launch enqueues the step on the device and returns before it runs (JAX's async dispatch), but
the launch itself is host work: JAX flattens the arguments and XLA enqueues the program's
kernels one by one. With EngineOptions.launch_thread it happens in a worker thread, beside the
engine's Python work on the step before (the GIL is released while XLA enqueues); the step's
outputs (the KV pool, the sampled ids the next step reads) are then taken from the launch when
first read.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import weakref

import jax
import numpy as np

from jinfer.kv_cache import KVCache

log = logging.getLogger(__name__)


class Launching:
    """Uses the runner's `_step`, `state`, `_mesh()`; the runner calls _setup_launches first.
    `_kv` and `_prev` are the arrays themselves: read their shapes there (a background compile),
    never their contents, while a launch may be under way."""

    _kv: KVCache
    _prev: tuple[jax.Array, jax.Array]

    def _setup_launches(self, launch_thread: bool) -> None:
        self._pending: concurrent.futures.Future | None = None  # the launch under way, if any
        self._join_lock = threading.Lock()  # the engine loop and a reader elsewhere may both join
        self._launches = None
        if launch_thread:
            self._launches = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jinfer-launch")
            # An idle worker must not outlive its runner (nor hold up the interpreter's exit).
            weakref.finalize(self, self._launches.shutdown, wait=False)

    @property
    def kv(self) -> KVCache:
        """The KV pool; with a launch thread, once the last step's launch has returned it."""
        self.join_launch()
        return self._kv

    @kv.setter
    def kv(self, value: KVCache) -> None:
        self.join_launch()
        self._kv = value

    @property
    def _prev_tokens(self) -> tuple[jax.Array, jax.Array]:
        self.join_launch()
        return self._prev

    @_prev_tokens.setter
    def _prev_tokens(self, value: tuple[jax.Array, jax.Array]) -> None:
        self.join_launch()
        self._prev = value

    def join_launch(self) -> None:
        """Takes the outputs of a launch still under way in the launch thread; raises its error,
        if it failed (the step's arrays stay those before it, and the launch counts as taken:
        the next call returns at once)."""
        if self._pending is None:
            return
        with self._join_lock:
            pending = self._pending
            if pending is None:
                return
            try:
                _, _, self._kv, self._prev = pending.result()
            finally:
                self._pending = None

    def drop_launch(self) -> None:
        """Waits for a launch under way and forgets it, failed or not (Engine.reset drops the
        step in flight unread)."""
        try:
            self.join_launch()
        except Exception:  # noqa: BLE001 - the step it launched is dropped
            log.exception("the step launched last failed; dropped")

    def _launch(self, fn, step, state, kv, prev, args):
        """Enqueues one step: fn, its compiled program, or (None) the jitted `step`, traced and
        compiled now under the runner's mesh. Everything it reads is passed in, as it was when
        the launch was asked for."""
        if fn is None:
            with self._mesh():
                out = step(state, kv, prev, *args)
        else:
            out = fn(state, kv, prev, *args)
        # Start reading the samples back now, while this step is the last one queued. With
        # async scheduling fetch() comes after the next step is dispatched; a copy asked for
        # only then can be queued behind that step, so the read-back of step N waits for step
        # N+1 and the host work adds to the device time instead of hiding behind it (on GPUs
        # the engine's steps measured as device + host time: benchmarks/engine.md).
        out[0].copy_to_host_async()
        out[1].copy_to_host_async()
        return out

    def fetch(self, handle) -> tuple[np.ndarray, np.ndarray]:
        """Waits for a dispatched step; (token ids, logprobs) per sampling row, in plan order:
        one row per scheduled sequence, 1 + num_draft for a sequence with a draft."""
        tokens, logprobs, n = handle
        if logprobs is None:  # launched in the launch thread: its launch first (its error here)
            if self._pending is tokens:
                self.join_launch()
            tokens, logprobs, _, _ = tokens.result()
        return np.asarray(tokens)[:n], np.asarray(logprobs)[:n]
