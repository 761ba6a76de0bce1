"""Compiled step programs kept in memory and shared by the runners of one model.

A runner compiles one program per step bucket for its mesh. JAX's persistent compilation cache
makes a second compile of the same program a disk read, but that read still traces the step
and deserializes the executable: ~0.7 s per bucket for the 5.1M test model on 8 fake CPU
devices, seconds per instance for a regroup that builds or reshards it. A ProgramStore keeps
the compiled executables themselves, so a runner built or resharded onto a mesh whose programs
another runner (or Instances.precompile) already compiled takes them as they are.

Programs are keyed by everything the compiled executable depends on: the model's graph
definition, the step's fixed sizes, the bucket, and the shape, dtype and sharding of every
argument the step takes (weights, KV pool, previous samples). Two runners whose keys match run
the same program on the same devices.
"""

from __future__ import annotations

import threading
from typing import Callable, NamedTuple

import jax


class ProgramKey(NamedTuple):
    """What a step program is compiled for: its bucket (tokens, seqs, decode_only, drafts) and the rest
    (the model's graph definition, the step's fixed sizes, every argument's signature)."""

    bucket: tuple
    step: tuple


def signature(tree) -> tuple:
    """The tree's structure and each leaf's (shape, dtype, sharding): what a compiled program
    expects of an argument."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(x.shape), str(x.dtype), getattr(x, "sharding", None)) for x in leaves)


class ProgramStore:
    """Compiled programs by key (thread-safe: background warm-ups of several runners share it).

    Memory grows with the programs kept: one per bucket and device group the owner compiles
    for. jinfer.instances.Instances keeps one for its replicas, so regroups reuse what
    precompile() compiled."""

    def __init__(self):
        self._programs: dict[ProgramKey, object] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.compiled = 0

    def __len__(self) -> int:
        return len(self._programs)

    def get_or_compile(self, key: ProgramKey, compile_fn: Callable[[], object]):
        """The program stored under key, else compile_fn()'s result, stored. Compilation runs
        outside the lock (two threads missing the same key both compile; the first kept)."""
        with self._lock:
            program = self._programs.get(key)
            if program is not None:
                self.hits += 1
                return program
        program = compile_fn()
        with self._lock:
            self.compiled += 1
            return self._programs.setdefault(key, program)
