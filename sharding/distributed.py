"""Meshes over several processes (hosts): jax.distributed set-up and host access to results.

Every process runs the same program on the same inputs (multi-controller SPMD): each builds
the same engine, gets the same requests in the same order and so schedules the same steps;
jax.devices() then lists the devices of all processes and a mesh over them spans the hosts.
Collectives go through NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import jax


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Joins this process to the cluster; call before any other JAX work.

    Raises ValueError naming the bad value (the coordinator would otherwise wait for a process
    that never comes, for minutes).
    """
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be >= 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator_address={coordinator_address!r} must be host:port")
    if num_processes == 1:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # unused on GPU
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def agree_min(value: int) -> int:
    """The smallest of every process's `value` (all processes must call it together); the
    value itself in a single process. A quantity each process measures for itself (free
    memory) sets one shape that every process's programs share."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    import numpy as np
    return int(np.min(multihost_utils.process_allgather(np.array([value], np.int64))))


def mesh_devices(tp: int) -> list:
    """The `tp` devices a tensor-parallel mesh takes: the first tp of this process alone, or,
    over several processes, tp / num_processes of each process's own devices (every process
    runs every step, so each must hold a share); ValueError naming tp when that cannot be."""
    processes = jax.process_count()
    if processes == 1:
        return jax.devices()[:tp]
    if tp % processes:
        raise ValueError(f"model.tp={tp} must be a multiple of the {processes} processes of the mesh "
                         "(each holds the same share of it)")
    per = tp // processes
    by_process = [[d for d in jax.devices() if d.process_index == p] for p in range(processes)]
    if any(len(local) < per for local in by_process):
        raise ValueError(f"model.tp={tp} over {processes} processes needs {per} devices in each; "
                         f"they have {[len(local) for local in by_process]}")
    return [d for local in by_process for d in local[:per]]
