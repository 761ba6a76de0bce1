"""Logical axis names -> mesh axes: one rules table, one resolving function."""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Logical axes of one K or V page array [num_kv_heads, num_pages, page_size, head_dim].
KV_LOGICAL_AXES = ("kv_heads", None, None, "head_dim")

# Megatron layout: heads and MLP columns split over `tp`; the residual stream replicated.
TP_RULES: Mapping[str, str | None] = {
    "embed": None,
    "norm": None,
    "q_heads": "tp",
    "kv_heads": "tp",
    "head_dim": None,
    "mlp": "tp",
    "vocab": "tp",
}


def logical_to_spec(axes: Sequence[str | None], rules: Mapping[str, str | None]) -> PartitionSpec:
    """PartitionSpec for an array whose dims carry `axes`; raises if a mesh axis is used twice."""
    mesh_axes = []
    for name in axes:
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        mesh_axes.append(None if name is None else rules[name])
    used = [a for a in mesh_axes if a is not None]
    if len(used) != len(set(used)):
        raise ValueError(f"logical axes {tuple(axes)} map mesh axes {tuple(mesh_axes)} more than once")
    return PartitionSpec(*mesh_axes)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, str | None] = TP_RULES):
    """NamedSharding per parameter of an NNX state, from each Variable's `out_sharding` axes."""
    def one(var):
        axes = var.get_metadata().get("out_sharding")
        if axes is None:
            raise ValueError(f"parameter of shape {var.get_value().shape} has no logical axes")
        return NamedSharding(mesh, logical_to_spec(axes, rules))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
