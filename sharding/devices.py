"""Partitioning a host's devices into disjoint groups, one 1-D tp mesh each (the device side
of engine instances; jinfer.instances builds and regroups the engines on them)."""

from __future__ import annotations

from typing import Sequence

import jax

from sharding.tp import make_mesh


def partition_devices(sizes: Sequence[int], devices: Sequence[jax.Device] | None = None) -> list:
    """Consecutive groups of `sizes` devices, one 1-D tp mesh each; raises ValueError naming
    the bad size or the shortfall."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = list(sizes)
    if not sizes:
        raise ValueError("sizes is empty: give at least one instance size")
    for s in sizes:
        if not isinstance(s, int) or s < 1:
            raise ValueError(f"instance size {s!r} must be a positive integer")
    if sum(sizes) > len(devices):
        raise ValueError(f"sizes {sizes} need {sum(sizes)} devices, {len(devices)} available")
    meshes, at = [], 0
    for s in sizes:
        meshes.append(make_mesh(s, devices[at:at + s]))
        at += s
    return meshes
