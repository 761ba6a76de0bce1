"""Tensor parallelism: a 1-D `tp` mesh, the rules for a model on it, and placing state and KV.

Megatron layout from sharding.rules.TP_RULES: q/k/v/gate/up split by output columns, o/down by
input rows (XLA inserts the all-reduce), embedding and LM head split over the vocabulary.
Adjustments per model:
- KV heads: split when tp divides num_kv_heads; replicated when num_kv_heads divides tp (every
  device keeps every KV head and computes K/V for all of them; query heads stay split).
- Vocabulary: split when tp divides vocab_size (and vocab_parallel), replicated otherwise.
  benchmarks/tp.md measures the two (tools/bench_tp.py).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Protocol, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.rules import KV_LOGICAL_AXES, TP_RULES, logical_to_spec, state_shardings

AXIS = "tp"


class ModelDims(Protocol):
    """The sizes tensor parallelism must divide (a jinfer ModelConfig has them)."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int


def tp_rules(cfg: ModelDims, tp: int, vocab_parallel: bool = True) -> Mapping[str, str | None]:
    """TP_RULES adjusted to cfg; raises ValueError naming what tp fails to divide.

    vocab_parallel=False keeps the embedding and the LM head whole on every device (each
    computes all logits; no gather of logits) instead of splitting them over the vocabulary.
    """
    if tp <= 0:
        raise ValueError(f"tp={tp} must be > 0")
    for name in ("num_heads", "intermediate_size"):
        if getattr(cfg, name) % tp:
            raise ValueError(f"tp={tp} does not divide {name}={getattr(cfg, name)}")
    rules = dict(TP_RULES)
    if cfg.num_kv_heads % tp:
        if tp % cfg.num_kv_heads:
            raise ValueError(f"tp={tp} and num_kv_heads={cfg.num_kv_heads}: one must divide the other")
        rules["kv_heads"] = None  # replicated: fewer KV heads than devices
    if cfg.vocab_size % tp or not vocab_parallel:
        rules["vocab"] = None
    return rules


def make_mesh(tp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over the first tp devices (or the given ones)."""
    devices = list(devices if devices is not None else jax.devices())
    if tp > len(devices):
        raise ValueError(f"tp={tp} needs {tp} devices, {len(devices)} available")
    return Mesh(np.array(devices[:tp]), (AXIS,))


@dataclasses.dataclass(frozen=True)
class TPLayout:
    """Where the model state and the KV cache live for one mesh."""

    mesh: Mesh
    rules: Mapping[str, str | None]

    @classmethod
    def for_model(cls, cfg: ModelDims, mesh: Mesh, vocab_parallel: bool = True) -> "TPLayout":
        return cls(mesh, tp_rules(cfg, mesh.shape[AXIS], vocab_parallel))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def kv_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, logical_to_spec(KV_LOGICAL_AXES, self.rules))

    def state_shardings(self, state: nnx.State):
        return state_shardings(state, self.mesh, self.rules)

    def place_state(self, state: nnx.State) -> nnx.State:
        """Moves (or reshards) every parameter onto its shards."""
        return jax.device_put(state, self.state_shardings(state))
