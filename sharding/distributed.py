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

