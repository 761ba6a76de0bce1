"""Compiling a runner's step buckets ahead of the steps that use them: all at once (warmup), or
the smallest now and the others in a background thread while the engine serves within the
buckets ready so far (warmup_background, ready_tokens)."""

from __future__ import annotations

import logging
import threading

import jax
import numpy as np

from jinfer.attention import TREE_WORDS, AttentionMetadata
from jinfer.device_drafts import DraftRows
from jinfer.programs import ProgramKey, signature
from jinfer.sampling import SamplingArrays

log = logging.getLogger(__name__)


class Warmup:
    """The runner's compilation of its step buckets (jinfer.runner.ModelRunner mixes it in): it
    uses the runner's jitted step (`_step`), its compiled programs (`_compiled`, and the shared
    ProgramStore `programs`), the buckets, the weights, the pool and the background warm-up's
    thread and events (`_warm_thread`, `_warm_go`, `_warm_stop`, `_warming`) that _bind makes."""

    def release_warmup(self) -> None:
        """Lets a background warm-up started with hold=True go on to the other buckets."""
        self._warm_go.set()

    def stop_warmup(self, timeout: float | None = None) -> None:
        """Stops a background warm-up after the compilation under way (waits up to timeout s)."""
        self._warm_stop.set()
        self._warm_go.set()  # a held warm-up wakes to stop
        if self._warm_thread is not None:
            self._warm_thread.join(timeout)

    def compiled_buckets(self) -> set[tuple[int, int, bool, bool]]:
        """The bucket keys (tokens, seqs, decode_only, drafts) whose step program is compiled."""
        return set(self._compiled)

    def traced_steps(self) -> int:
        """How many step variants have been traced in this process: a step outside the
        compiled buckets adds one (tests check that serving compiles nothing)."""
        return self._step._cache_size() + self._first_use_compiles

    def wait_warmup(self, timeout: float | None = None) -> bool:
        """Waits up to timeout s for a background warm-up to finish; True when none is running."""
        if self._warm_thread is not None:
            self._warm_thread.join(timeout)
        return self._warm_thread is None or not self._warm_thread.is_alive()

    def warmup(self, progress: bool = False) -> None:
        """Compiles every bucket variant ahead of time (progress: a bar on stderr). Without it
        each variant compiles on its first step (JAX's persistent compilation cache, when
        enabled, makes that a disk read after the first run)."""
        keys = self.bucket_keys()
        if progress:
            from tqdm import tqdm
            keys = tqdm(keys, desc="compiling step buckets", unit="bucket")
        for key in keys:
            if key not in self._compiled:
                self._compile_key(key, self._compiled)
        log.info("compiled %d step buckets", len(self._compiled))

    def _compile_key(self, key: tuple[int, int, bool, bool], into: dict) -> bool:
        """Puts key's program into `into`; True when it was compiled here (not taken from the store)."""
        # Shapes only for the pool and the previous samples: a background compile must not
        # touch arrays the step in flight donates or replaces, nor wait for a launch under way
        # in the launch thread (jinfer/launching.py: `_kv` and `_prev` without joining it).
        kv = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self._kv)
        prev = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self._prev)
        inputs = self._empty_inputs(*key)

        compiled = []

        def compile_step():
            compiled.append(key)
            with self._mesh():
                return self._step.lower(self.state, kv, prev, *inputs).compile()

        if self.programs is None:
            into[key] = compile_step()
            return True
        step = (self.graphdef, self._max_rows, self.max_spec_tokens, self.pages_per_seq, self.trees,
                signature(self.state), signature(kv), signature(prev))
        into[key] = self.programs.get_or_compile(ProgramKey(key, step), compile_step)
        return bool(compiled)

    def warmup_background(self, progress: bool = False, hold: bool = False) -> threading.Thread:
        """Compiles the smallest token bucket now and the others, smallest first, in a thread.

        A server is ready after the smallest bucket's programs (one; with speculation or a
        decode path, up to three) instead of all of them; until a bucket is
        compiled, ready_tokens() stays below it and the engine caps each step's token budget
        there (longer prompts are prefilled in chunks), so no step waits on a compilation.
        hold: the thread waits for release_warmup() before the other buckets (a server sets
        itself up first instead of sharing the CPU with them). Returns the thread (join it to
        wait for the rest)."""
        keys = sorted(self.bucket_keys())
        compiled, first = self._compiled, keys[0][0]
        for key in (k for k in keys if k[0] == first):
            self._compile_key(key, compiled)
        todo = [k for k in keys if k not in compiled]  # ascending: ready_tokens() grows bucket by bucket
        warming, stop, go = self._warming, self._warm_stop, self._warm_go
        warming.update(todo)
        if not hold:
            go.set()

        def rest():
            items = todo
            if progress:
                from tqdm import tqdm
                items = tqdm(todo, desc="compiling the other step buckets (serving meanwhile)", unit="bucket")
            go.wait()
            try:
                for key in items:
                    if stop.is_set():  # rebound to another layout, or shutting down
                        return
                    self._compile_key(key, compiled)
                    warming.discard(key)
                log.info("compiled %d step buckets in the background", len(compiled))
            except Exception:  # noqa: BLE001 - serving goes on; the rest compile on first use
                log.exception("background compilation failed; the remaining buckets compile on first use")
                warming.clear()

        thread = self._warm_thread = threading.Thread(target=rest, name="bucket-warmup", daemon=True)
        thread.start()
        return thread

    def ready_tokens(self) -> int:
        """The largest step (tokens) whose bucket, and every smaller one, is compiled or may be
        compiled on use: the whole token budget unless a background warm-up is under way."""
        warming = set(self._warming)  # one snapshot: the warm-up thread removes keys meanwhile
        if not warming:
            return self.token_buckets[-1]
        first_missing = min(k[0] for k in warming)
        return max([t for t in self.token_buckets if t < first_missing], default=self.token_buckets[0])

    def _empty_inputs(self, t: int, s: int, decode_only: bool = False, drafts: bool = False):
        tree_bits = np.full((t, TREE_WORDS), -1, np.int32) if self.trees and drafts and not decode_only else None
        md = AttentionMetadata(np.zeros(s + 1, np.int32), np.zeros(s, np.int32),
                               np.zeros((s, self.pages_per_seq), np.int32), np.zeros(1, np.int32),
                               decode_only, tree_bits)
        r = self.rows(t, s, drafts)
        draft_rows = DraftRows.empty(r, tree_bits is not None) if drafts else None
        return (np.zeros(t, np.int32), np.full(t, -1, np.int32), np.zeros(t, np.int32), md,
                np.zeros(r, np.int32), SamplingArrays.from_rows([], r), np.full(r, s, np.int32), draft_rows)
