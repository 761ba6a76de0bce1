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

import jax
import numpy as np

from jinfer.kv_cache import KVCache


class Launching:
    """Uses the runner's `_step`, `state`, `_mesh()`, and `_launches` (a one-thread executor or
    None) and `_pending` (the launch under way there) that the runner sets up."""

    _pending: concurrent.futures.Future | None
    _kv: KVCache
    _prev: jax.Array

    @property
    def kv(self) -> KVCache:
        """The KV pool; with a launch thread, once the last step's launch has returned it."""
        self._join()
        return self._kv

    @kv.setter
    def kv(self, value: KVCache) -> None:
        self._join()
        self._kv = value

    @property
    def _prev_tokens(self) -> jax.Array:
        self._join()
        return self._prev

    @_prev_tokens.setter
    def _prev_tokens(self, value: jax.Array) -> None:
        self._join()
        self._prev = value

    def _join(self) -> None:
        """Takes the outputs of a launch still under way in the launch thread (its error, if
        it failed: the step's arrays stay those before it)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._prev, _, self._kv = pending.result()

    def _launch(self, fn, kv, prev, args):
        """Enqueues one step (fn: its compiled program, None: trace and compile it now)."""
        if fn is None:
            with self._mesh():
                out = self._step(self.state, kv, prev, *args)
        else:
            out = fn(self.state, kv, prev, *args)
        # Start reading the samples back now, while this step is the last one queued. With
        # async scheduling fetch() comes after the next step is dispatched; a copy asked for
        # only then can be queued behind that step, so the read-back of step N waits for step
        # N+1 and the host work adds to the device time instead of hiding behind it (on GPUs
        # the engine's steps measured as device + host time: benchmarks/engine.md).
        out[0].copy_to_host_async()
        out[1].copy_to_host_async()
        return out

    @staticmethod
    def fetch(handle) -> tuple[np.ndarray, np.ndarray]:
        """Waits for a dispatched step; (token ids, logprobs) per sampling row, in plan order:
        one row per scheduled sequence, 1 + num_draft for a sequence with a draft."""
        tokens, logprobs, n = handle
        if logprobs is None:  # launched in the launch thread: wait for the launch first
            tokens, logprobs, _ = tokens.result()
        return np.asarray(tokens)[:n], np.asarray(logprobs)[:n]
