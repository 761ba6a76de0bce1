"""Saving and restoring model state with orbax-checkpoint."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx


def save_state(path: str, model: nnx.Module) -> None:
    """Writes the model's parameters to `path` (a new directory; absolute or relative)."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise ValueError(f"checkpoint path {path} already exists")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, nnx.state(model, nnx.Param))


def restore_state(path: str, abstract_model: nnx.Module, shardings=None) -> nnx.Module:
    """Restores parameters into a model built with nnx.eval_shape.

    shardings: optional pytree of jax.sharding.Sharding matching nnx.state(abstract_model); each
    array is read straight into its target shards (no full copy on one device).
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint path {path} does not exist")
    graphdef, abstract_state = nnx.split(abstract_model)
    if shardings is None:
        device = jax.devices()[0]
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), abstract_state)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(path, target)
    return nnx.merge(graphdef, state)
