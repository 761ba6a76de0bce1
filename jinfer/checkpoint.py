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

    shardings: optional nnx.State shaped like the model's with a jax.sharding.Sharding in place of
    each Variable (sharding.rules.state_shardings makes one); each array is read straight into
    its target shards (no full copy on one device).
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint path {path} does not exist")
    graphdef, abstract_state = nnx.split(abstract_model)
    is_var = lambda x: isinstance(x, nnx.Variable)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract_state, is_leaf=is_var)

    def target(var, sharding):
        shape = var.get_value()
        return var.replace(jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding))

    target = jax.tree.map(target, abstract_state, shardings, is_leaf=is_var)
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(path, target)
    return nnx.merge(graphdef, state)
