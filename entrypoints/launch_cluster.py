"""Serves jinfer on a Ray cluster: N replicas (each a Ray actor owning a jinfer server) behind the
router (another actor, which learns the replicas from Ray), until SIGINT/SIGTERM; or scales or
stops a cluster that runs. Needs the `cluster` extra (Ray). docs/cluster.md has the set-up from
one machine to a GPU cluster.

  # one machine: a local Ray cluster, 2 replicas of the default model, the router on :50051
  python tools/launch_cluster.py --replicas=2 --port=50051 --http_port=8000
  # an existing Ray cluster (ray start --head ...; workers joined), 4 GPU replicas
  python tools/launch_cluster.py --ray_address=auto --replicas=4 --replica_gpus=1 --replica_cpus=4 \\
      --config.model.path=/models/llama --policy=preble-e2 --cost_model=cost.json
  # replicas of tp=16 over two 8-GPU hosts each (one jax.distributed mesh per replica)
  python tools/launch_cluster.py --ray_address=auto --replicas=2 --hosts_per_replica=2 --replica_gpus=8 \\
      --config.model.tp=16 --config.model.path=/models/llama-70b
  # from another shell, while it runs: grow or shrink it, or stop it
  python tools/launch_cluster.py --ray_address=auto --scale_to=6
  python tools/launch_cluster.py --ray_address=auto --stop

The replicas get the launch config exactly as tools/launch_server.py takes it (--config=FILE and
--config.<section>.<field>=value overrides, checked here first); their host and ports are set
per node (the node's address, free ports). A replica actor that dies is restarted by Ray
(--max_restarts) and rejoins the router at its new address; replicas added or removed join or
leave the router within --reconcile_s. SIGTERM drains the router, then each replica.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

from absl import app, flags

from entrypoints.process import wait_for_stop_signal, write_port_file

from jinfer.launch import define_config_flag, parse_flags
from scheduler.routing.policies import ROUTERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = define_config_flag(os.path.join(ROOT, "configs", "default.py"))
FLAGS = flags.FLAGS
flags.DEFINE_integer("replicas", 2, "Replica actors to start.", lower_bound=1)
flags.DEFINE_string("ray_address", "", "Ray cluster to join (auto: the one `ray start` began on this machine; "
                    "host:port: its head); empty: start a local one for this process (gone when it exits).")
flags.DEFINE_string("namespace", "jinfer", "Ray namespace of the cluster's actors.")
flags.DEFINE_string("name", "jinfer", "Names the actors (<name>-router, <name>-replica-<k>): several clusters "
                    "can share a Ray namespace under different names.")
flags.DEFINE_float("replica_cpus", 1.0, "Ray CPUs each replica actor reserves.", lower_bound=0)
flags.DEFINE_float("replica_gpus", 0.0, "Ray GPUs each replica actor reserves (its server sees those).",
                   lower_bound=0)
flags.DEFINE_integer("hosts_per_replica", 1, "Processes (hosts) of each replica's mesh: one jax.distributed mesh "
                     "whose processes Ray gang-places, each reserving --replica_cpus / --replica_gpus; "
                     "--config.model.tp counts the devices of all of them.", lower_bound=1)
flags.DEFINE_enum("placement", "STRICT_SPREAD", ["STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK"],
                  "Ray placement-group strategy for a replica's processes (STRICT_SPREAD: one node each).")
flags.DEFINE_float("router_cpus", 0.0, "Ray CPUs the router actor reserves (it relays; it holds no model).",
                   lower_bound=0)
flags.DEFINE_integer("max_restarts", -1, "Times Ray restarts a dead replica actor (-1: always).", lower_bound=-1)
flags.DEFINE_enum("policy", "least-load", ROUTERS, "Routing policy (preble-e2 needs --cost_model).")
flags.DEFINE_string("cost_model", "", "Cost model JSON for preble-e2 (tools/profile_engine.py).")
flags.DEFINE_integer("port", 50051, "The router's gRPC port on its node (0 picks a free one).", lower_bound=0,
                     upper_bound=65535)
flags.DEFINE_integer("http_port", None, "The router's OpenAI-compatible HTTP port (0 picks a free one; unset: "
                     "none).", lower_bound=0, upper_bound=65535)
flags.DEFINE_float("reconcile_s", 1.0, "How often the router re-reads the replicas from Ray.", lower_bound=0.01)
flags.DEFINE_float("health_interval_s", 1.0, "The router's health checks of each replica, this often.",
                   lower_bound=1e-3)
flags.DEFINE_float("start_timeout_s", 900.0, "How long a replica's server may take to start.", lower_bound=1)
flags.DEFINE_float("shutdown_grace_s", 10.0, "In-flight streams get this long on shutdown.", lower_bound=0)
flags.DEFINE_integer("scale_to", 0, "Instead of starting a cluster: grow or shrink the running one to this many "
                     "replicas, then exit.", lower_bound=0)
flags.DEFINE_bool("stop", False, "Instead of starting a cluster: drain and stop the running one, then exit.")
flags.DEFINE_string("port_file", "", "Once serving, write {\"host\", \"port\", \"http_port\", \"pid\"} as JSON here.")

log = logging.getLogger("jinfer.launch_cluster")


def _server_args(argv: list[str]) -> tuple[str, ...]:
    """The launch config flags as given (--config and its overrides), for the replicas."""
    return tuple(a for a in argv[1:] if a == "--config" or a.startswith(("--config=", "--config.")))


def _spec(server_args):
    from entrypoints.cluster import ClusterSpec
    router = {"port": FLAGS.port, "http_port": FLAGS.http_port, "health_interval_s": FLAGS.health_interval_s,
              "shutdown_grace_s": FLAGS.shutdown_grace_s, "connect_timeout_s": FLAGS.start_timeout_s}
    return ClusterSpec(name=FLAGS.name, server_args=server_args, replica_cpus=FLAGS.replica_cpus,
                       replica_gpus=FLAGS.replica_gpus, router_cpus=FLAGS.router_cpus,
                       max_restarts=FLAGS.max_restarts, policy=FLAGS.policy, cost_model=FLAGS.cost_model,
                       router_args=tuple(router.items()), reconcile_s=FLAGS.reconcile_s,
                       start_timeout_s=FLAGS.start_timeout_s, hosts_per_replica=FLAGS.hosts_per_replica,
                       placement=FLAGS.placement)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    if FLAGS.policy == "preble-e2" and not FLAGS.cost_model:
        sys.exit("error: --policy=preble-e2 needs --cost_model (tools/profile_engine.py makes one)")
    import ray
    from entrypoints import cluster

    ray.init(address=FLAGS.ray_address or None, namespace=FLAGS.namespace, log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH"))
                                                                      if p)}})
    if FLAGS.stop:
        cluster.shutdown(FLAGS.name, FLAGS.shutdown_grace_s)
        return
    if FLAGS.scale_to:
        print(json.dumps({"replicas": cluster.scale(FLAGS.name, FLAGS.scale_to)}), flush=True)
        return
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)  # while starting: start() stops what it began
    try:
        router = cluster.start(_spec(_server_args(sys.argv)), FLAGS.replicas)
    except (ValueError, TimeoutError, ray.exceptions.RayError) as e:
        sys.exit(f"error: the cluster did not start: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted while starting: what was started is stopped")
    ports = ray.get(router.ports.remote())
    log.info("routing across %d replicas: clients connect to %s:%d (HTTP port %s)", FLAGS.replicas, ports["host"],
             ports["port"], ports["http_port"])
    if FLAGS.port_file:
        write_port_file(FLAGS.port_file, ports)
    wait_for_stop_signal()
    log.info("shutting down (grace %.1fs)", FLAGS.shutdown_grace_s)
    cluster.shutdown(FLAGS.name, FLAGS.shutdown_grace_s)
    ray.shutdown()
    if FLAGS.port_file and os.path.exists(FLAGS.port_file):
        os.remove(FLAGS.port_file)


def run() -> None:
    """The entry point (python -m entrypoints.launch_cluster, tools/launch_cluster.py)."""
    app.run(main, flags_parser=parse_flags)
