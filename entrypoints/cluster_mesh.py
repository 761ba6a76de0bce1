"""A replica spanning several hosts on Ray: one jax.distributed mesh whose processes Ray places.

A replica of `hosts` processes reserves a placement group of `hosts` bundles (one per process:
its CPUs and GPUs; STRICT_SPREAD puts each on its own node, PACK lets a one-machine cluster
hold them all) and starts a MeshMember actor in each. Member 0 picks the coordinator's port on
its node; every member then starts `entrypoints.serve` with the same flags plus the mesh's
(--coordinator_address, --num_processes, --process_id). Member 0's server is the replica's
leader: it serves, and its steps are repeated by the others (jinfer/mirror.py).

The mesh lives and dies as one: a process that dies ends the others (the mirror's channel
closes), and the ReplicaActor that made the members watches them and ends itself when any
exits, so Ray restarts it and it builds a new mesh (its members and placement group die with
it: Ray fate-shares them with their creator).
"""

from __future__ import annotations

import socket
import threading

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from entrypoints.process import ServerProcess


class MeshMember:
    """One process of a replica's mesh: a jinfer server given the mesh flags."""

    def __init__(self):
        self.host = ray.util.get_node_ip_address()
        self.proc: ServerProcess | None = None
        self._started = threading.Event()

    def coordinator(self) -> str:
        """host:port for the mesh's coordinator on this node (a port free now)."""
        with socket.socket() as s:
            s.bind((self.host, 0))
            return f"{self.host}:{s.getsockname()[1]}"

    def start(self, server_args: list[str], coordinator: str, processes: int, rank: int,
              timeout: float) -> str | None:
        """Starts this member's server; the leader's (rank 0) target once it serves, else None."""
        args = [*server_args, f"--config.serving.host={self.host}", "--config.serving.port=0",
                "--config.serving.metrics_port=0", f"--coordinator_address={coordinator}",
                f"--num_processes={processes}", f"--process_id={rank}"]
        self.proc = ServerProcess(args, die_with_parent=True, host=self.host).start()
        self._started.set()
        return self.proc.wait_ready(timeout).target if rank == 0 else None

    def wait(self) -> int:
        """Blocks until the server exits; its exit code (after start(): Ray runs a threaded
        actor's calls in any order, so this waits for start to make the process)."""
        self._started.wait()
        return self.proc.proc.wait()

    def pid(self) -> int:
        return self.proc.proc.pid

    def stop(self, timeout: float = 60.0) -> int:
        return self.proc.stop(timeout)


def start_mesh(server_args: list[str], hosts: int, cpus: float, gpus: float, placement: str,
               timeout: float) -> tuple[list, str, list]:
    """Places and starts a mesh of `hosts` server processes; (member actors, the leader's target,
    a ref per member that resolves to its server's exit code when it exits). TimeoutError when
    Ray cannot place the bundles or the leader does not serve in `timeout`; RuntimeError when a
    member's server exits first."""
    bundle = {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}  # non-empty: cluster._check_resources
    group = placement_group([bundle] * hosts, strategy=placement)
    try:
        ray.get(group.ready(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"Ray could not place {hosts} bundles of {bundle} ({placement}) in {timeout:g}s: "
                           "`ray status` shows what each node has free") from None
    member = ray.remote(MeshMember)
    members = [member.options(num_cpus=cpus, num_gpus=gpus, max_concurrency=4, max_restarts=0,
                              scheduling_strategy=PlacementGroupSchedulingStrategy(group, i)).remote()
               for i in range(hosts)]
    coordinator = ray.get(members[0].coordinator.remote(), timeout=timeout)
    started = [m.start.remote(server_args, coordinator, hosts, rank, timeout) for rank, m in enumerate(members)]
    ray.get(started[1:], timeout=timeout)  # each member's server process is running
    exits = [m.wait.remote() for m in members]
    done, _ = ray.wait([started[0], *exits], num_returns=1, timeout=timeout + 60)
    if not done:
        raise TimeoutError(f"the mesh's leader was not serving after {timeout:g}s")
    if done[0] != started[0]:  # a member's server exited first (its log says why)
        rank = exits.index(done[0])
        raise RuntimeError(f"process {rank} of the mesh exited with code {ray.get(done[0])} before it served")
    return members, ray.get(started[0]), exits
