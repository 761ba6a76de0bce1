"""jinfer on a Ray cluster: every replica a Ray actor owning one jinfer server process (or,
spanning several hosts, the member actors of its mesh: cluster_mesh.py), the router an actor
that learns the replicas from Ray (tools/launch_cluster.py starts them).

- `ReplicaActor` starts `python -m entrypoints.serve` with the launch config's flags on its
  node (bound to the node's address, ports picked free) and reports its target. The server
  gets SIGTERM when the actor's process dies (it never outlives it); Ray restarts a dead actor
  (max_restarts), whose new server has a new port.
- `RouterActor` runs the RouterServer in its own process and, every `reconcile_s`, lists the
  replica actors of its namespace (named `<name>-replica-<k>`), asks each for its target and
  brings the router up to date: a new replica joins cold, a removed (or restarted, hence
  moved) one leaves (`RouterServer.add_replica` / `remove_replica`). Scaling is therefore
  creating or killing named replica actors (`scale`), from the launcher or any Ray driver
  connected to the same cluster and namespace.

Every actor is detached (it outlives the driver that made it, so another driver can scale the
cluster); `shutdown` drains the router, then the replicas (SIGTERM: each drains its
requests), and kills the actors. Ray is imported only here (the `cluster` extra).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time

import ray

from entrypoints.process import ServerProcess

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """What a cluster's actors are made of.

    name: prefix of the actors' names (`<name>-router`, `<name>-replica-<k>`) in the Ray
    namespace. server_args: the replicas' server flags (the launch config, as for
    tools/launch_server.py). replica_cpus / router_cpus: Ray CPUs each actor reserves;
    replica_gpus: GPUs each replica reserves (Ray sets CUDA_VISIBLE_DEVICES for it).
    max_restarts: how often Ray restarts a dead replica actor (-1: always). router_args:
    RouterConfig fields for the router (port, http_port, health_interval_s, ...); policy:
    a routing policy name (scheduler/routing/policies.ROUTERS); cost_model: its JSON file
    (preble-e2). reconcile_s: how often the router re-reads the replicas from Ray.
    start_timeout_s: how long a replica's server may take to start. hosts_per_replica: the
    processes of each replica's mesh (model.tp in server_args counts all their devices), each
    with replica_cpus / replica_gpus of its own, placed by `placement` (a Ray placement-group
    strategy: STRICT_SPREAD, one node each; PACK on one machine) (entrypoints/cluster_mesh.py).
    """

    name: str = "jinfer"
    server_args: tuple[str, ...] = ()
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    router_cpus: float = 0.0
    max_restarts: int = -1
    policy: str = "least-load"
    cost_model: str = ""
    router_args: tuple[tuple[str, object], ...] = ()
    reconcile_s: float = 1.0
    start_timeout_s: float = 900.0
    hosts_per_replica: int = 1
    placement: str = "STRICT_SPREAD"

    def replica_name(self, k: int) -> str:
        return f"{self.name}-replica-{k}"

    @property
    def router_name(self) -> str:
        return f"{self.name}-router"


class ReplicaActor:
    """One jinfer server on this actor's node, or the members of its mesh over several hosts
    (spec.hosts_per_replica; see the module docstring)."""

    def __init__(self, spec: ClusterSpec):
        self.host = ray.util.get_node_ip_address()
        self._stopping = False
        self.members, self.proc = [], None
        if spec.hosts_per_replica > 1:
            from entrypoints.cluster_mesh import start_mesh
            self.members, self._target, exits = start_mesh(list(spec.server_args), spec.hosts_per_replica,
                                                           spec.replica_cpus, spec.replica_gpus, spec.placement,
                                                           spec.start_timeout_s)
            threading.Thread(target=self._watch, args=(lambda: _first_exit(exits),), name="mesh-watch",
                             daemon=True).start()
            return
        args = [*spec.server_args, f"--config.serving.host={self.host}", "--config.serving.port=0",
                "--config.serving.metrics_port=0"]
        self.proc = ServerProcess(args, die_with_parent=True, host=self.host).start()
        self._target = self.proc.wait_ready(spec.start_timeout_s).target
        threading.Thread(target=self._watch, args=(self.proc.proc.wait,), name="server-watch", daemon=True).start()

    def _watch(self, wait_exit) -> None:
        """A server (any process of the mesh) that exits while the actor lives ends the actor's
        process, so Ray restarts the replica (with a new server) rather than the router keeping
        a dead address."""
        code = wait_exit()
        if not self._stopping:
            log.error("the replica's server exited (%s): ending the actor so Ray restarts it", code)
            os._exit(1)

    def target(self) -> str:
        """host:port of the server's gRPC API (the mesh leader's)."""
        return self._target

    def pid(self) -> int:
        """The server process's pid (the mesh leader's)."""
        return self.pids()[0]

    def pids(self) -> list[int]:
        """Every server process's pid: the server's, or each mesh member's in rank order."""
        if self.proc is not None:
            return [self.proc.proc.pid]
        return ray.get([m.pid.remote() for m in self.members])

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM to the server (it drains; a mesh leader then stops its followers); its exit code."""
        self._stopping = True
        if self.proc is not None:
            return self.proc.stop(timeout)
        code = ray.get(self.members[0].stop.remote(timeout))
        ray.get([m.stop.remote(timeout) for m in self.members[1:]])
        return code


def _first_exit(exits) -> str:
    """Waits for the first of a mesh's members to exit; which one, and how."""
    done = ray.wait(exits, num_returns=1)[0][0]
    try:
        code = f"exit code {ray.get(done)}"
    except ray.exceptions.RayError as e:  # the member actor itself died
        code = f"its actor died: {type(e).__name__}"
    return f"process {exits.index(done)} of the mesh ended, {code}"


class RouterActor:
    """The router, kept in step with the replica actors Ray has (see the module docstring)."""

    def __init__(self, spec: ClusterSpec, targets: list[str]):
        from entrypoints.routing import router_server
        from jinfer.router.config import RouterConfig
        from scheduler.cost_model import CostModel

        self.spec = spec
        cost = CostModel.load(spec.cost_model) if spec.cost_model else None
        self.host = ray.util.get_node_ip_address()
        config = RouterConfig(**{"host": self.host, **dict(spec.router_args)})
        self.server = router_server(targets, spec.policy, cost, config=config, tokenizer="auto").start()
        self._known: dict[str, str] = {}  # replica actor name -> its target when last asked
        self._lock = threading.Lock()  # one reconciliation at a time (the loop's, or a caller's)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._reconcile_loop, name="reconcile", daemon=True)
        self._thread.start()

    def ports(self) -> dict:
        return {"port": self.server.port, "http_port": self.server.http_port, "host": self.host}

    def targets(self) -> list[str]:
        """The replicas the router routes to (up or down), in index order."""
        return self.server.replica_targets()

    def spec_of_cluster(self) -> ClusterSpec:
        return self.spec

    def reconcile(self) -> list[str]:
        """Brings the router's replicas in line with the replica actors Ray has now; returns
        the router's targets after. A replica actor that does not answer in time (it is
        restarting) keeps its last target until it does."""
        with self._lock:
            return self._reconcile()

    def _reconcile(self) -> list[str]:
        names = replica_names(self.spec.name)
        for name in list(self._known):
            if name not in names:
                del self._known[name]
        for name in names:
            try:
                self._known[name] = ray.get(ray.get_actor(name).target.remote(), timeout=self.spec.reconcile_s)
            except ValueError:  # killed since the listing (Ray lists it a while after)
                self._known.pop(name, None)
            except ray.exceptions.RayError:
                pass  # restarting: keeps its last target until it answers
        wanted, have = set(self._known.values()), self.server.replica_targets()
        for target in have:
            if target not in wanted and len(have) > 1:  # the router keeps its last replica
                self.server.remove_replica(target)
                have = [t for t in have if t != target]
        for target in sorted(wanted - set(have)):
            try:  # a bounded wait: a replica that died since it answered is tried again next round
                self.server.add_replica(target, timeout=max(5.0, 10 * self.spec.reconcile_s))
            except (ConnectionError, ValueError) as e:
                log.warning("replica %s not added: %s", target, e)
        return self.server.replica_targets()

    def _reconcile_loop(self) -> None:
        while not self._stop.wait(self.spec.reconcile_s):
            try:
                self.reconcile()
            except Exception:  # noqa: BLE001 - one bad round must not end the loop
                log.exception("reconciling the router with Ray failed; trying again")

    def stop(self, grace: float | None = None) -> None:
        """Stops reconciling and drains the router (in-flight streams get `grace` seconds)."""
        self._stop.set()
        self._thread.join()
        self.server.stop(grace)


def _replica_actor(spec: ClusterSpec, k: int):
    cls = ray.remote(ReplicaActor)
    mesh = spec.hosts_per_replica > 1  # the members reserve the resources, each in its bundle
    return cls.options(name=spec.replica_name(k), lifetime="detached", num_cpus=0 if mesh else spec.replica_cpus,
                       num_gpus=0 if mesh else spec.replica_gpus, max_restarts=spec.max_restarts,
                       max_concurrency=4 if mesh else 1,  # pids() while a call waits on the members
                       max_task_retries=-1 if spec.max_restarts else 0).remote(spec)  # calls wait out a restart


def start(spec: ClusterSpec, replicas: int):
    """Starts `replicas` replica actors, waits until each serves, then the router actor; returns
    the router actor's handle. Call with Ray initialised (ray.init) in the cluster's namespace.
    On any failure (or an interrupt) what was started is stopped again. ValueError when Ray has
    not the free resources; TimeoutError when the replicas do not serve within start_timeout_s."""
    if replicas < 1:
        raise ValueError(f"replicas={replicas} must be >= 1")
    _check_resources(spec, replicas)
    try:
        actors = [_replica_actor(spec, k) for k in range(replicas)]
        targets = _get([a.target.remote() for a in actors], spec.start_timeout_s, "the replicas to serve")
        router = ray.remote(RouterActor).options(name=spec.router_name, lifetime="detached",
                                                 num_cpus=spec.router_cpus, max_restarts=0)
        router = router.remote(spec, targets)
        _get(router.ports.remote(), spec.start_timeout_s, "the router to serve")
    except BaseException:
        shutdown(spec.name, grace=0)
        raise
    return router


def _get(refs, timeout: float, what: str):
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"waited {timeout:g}s for {what} (can Ray place the actors? `ray status` shows what "
                           "is free per node)") from None


def _check_resources(spec: ClusterSpec, replicas: int, router: bool = True) -> None:
    """ValueError naming the shortfall when the Ray cluster has not the free CPUs / GPUs for
    `replicas` more replica actors (and the router) in all. (Free resources split over nodes
    can still fall short of one actor's: the start's timeout catches that.)"""
    free = ray.available_resources()
    if spec.hosts_per_replica > 1 and spec.replica_cpus <= 0 and spec.replica_gpus <= 0:
        raise ValueError("a replica over several hosts reserves CPUs or GPUs for each of its processes: set "
                         "replica_cpus or replica_gpus above 0")
    processes = replicas * spec.hosts_per_replica
    need = {"CPU": processes * spec.replica_cpus + (spec.router_cpus if router else 0.0),
            "GPU": processes * spec.replica_gpus}
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    if spec.placement.startswith("STRICT_SPREAD") and spec.hosts_per_replica > nodes:
        raise ValueError(f"hosts_per_replica={spec.hosts_per_replica} with placement {spec.placement} needs that "
                         f"many nodes; the Ray cluster has {nodes} (placement PACK shares nodes)")
    for kind, n in need.items():
        if n > free.get(kind, 0.0) + 1e-9:
            raise ValueError(f"{replicas} more replica(s) need {n:g} {kind}s but the Ray cluster has "
                             f"{free.get(kind, 0.0):g} free: lower the per-replica {kind}s, or add nodes")


def replica_names(name: str) -> list[str]:
    """The replica actors of cluster `name` in this Ray namespace, by name, in index order."""
    prefix = f"{name}-replica-"
    names = [n for n in ray.util.list_named_actors() if n.startswith(prefix)]  # this namespace's, by name
    return sorted(names, key=lambda n: int(n[len(prefix):]))


def scale(name: str, replicas: int, timeout: float = 900.0) -> list[str]:
    """Grows or shrinks the running cluster `name` (in this driver's Ray namespace) to
    `replicas` replica actors: new ones start with the cluster's server flags, the newest go
    first (their servers drain); waits until the router routes to exactly the remaining ones
    and Ray no longer lists the ones that left (TimeoutError if not within `timeout`).
    Returns the router's targets."""
    if replicas < 1:
        raise ValueError(f"replicas={replicas} must be >= 1 (shutdown stops a cluster)")
    router = ray.get_actor(f"{name}-router")
    spec = ray.get(router.spec_of_cluster.remote())
    names = replica_names(name)
    if replicas > len(names):
        _check_resources(spec, replicas - len(names), router=False)
    next_k = max((int(n.rsplit("-", 1)[1]) for n in names), default=-1) + 1
    kept = [ray.get_actor(n) for n in names[:replicas]]
    new = [_replica_actor(spec, next_k + i) for i in range(replicas - len(names))]
    _get([a.target.remote() for a in new], timeout, "the new replicas to serve")
    leaving = names[replicas:]
    for n in leaving[::-1]:
        _stop_replica(ray.get_actor(n), spec.start_timeout_s)
    # the kept handles, not a new listing: Ray may list a killed actor for a while after the kill
    want = set(_get([a.target.remote() for a in kept + new], timeout, "the replicas"))
    deadline = time.monotonic() + timeout
    while (targets := ray.get(router.reconcile.remote())) and (
            set(targets) != want or set(leaving) & set(replica_names(name))):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the router routes to {targets}, not to the cluster's replicas {sorted(want)} "
                               f"(or Ray still lists one of {leaving}), after {timeout:g}s")
        time.sleep(spec.reconcile_s)
    return targets


def _stop_replica(actor, timeout: float) -> None:
    try:
        ray.get(actor.stop.remote(), timeout=timeout)
    except ray.exceptions.RayError as e:  # dead for good, or hung: killed all the same
        log.warning("a replica did not stop cleanly: %s", e)
    ray.kill(actor, no_restart=True)


def shutdown(name: str, grace: float = 10.0) -> None:
    """Drains and stops the router, then every replica's server, and kills the actors; works
    on what is left of a cluster (a router that died, replicas that never started)."""
    try:
        router = ray.get_actor(f"{name}-router")
    except ValueError:  # never started, or gone
        router = None
    if router is not None:
        try:
            ray.get(router.stop.remote(grace), timeout=grace + 60)
        except ray.exceptions.RayError as e:
            log.warning("the router did not stop cleanly: %s", e)
        ray.kill(router, no_restart=True)
    for n in replica_names(name):
        try:
            actor = ray.get_actor(n)
        except ValueError:  # killed since the listing
            continue
        _stop_replica(actor, grace + 60)
