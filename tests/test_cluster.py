"""jinfer on a local Ray cluster (entrypoints/cluster.py, tools/launch_cluster.py): replicas as
Ray actors behind the router actor, on loopback with the 5.1M test model. Two replicas serve a
single server's greedy tokens; a killed replica actor is restarted by Ray and rejoins the router;
the cluster scales up and down while serving; shutdown leaves no server process behind."""

import os
import random
import signal
import socket
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray", reason="the cluster extra (Ray) is not installed")

from entrypoints import cluster  # noqa: E402 - after the skip
from jinfer.serving.client import Client  # noqa: E402
from tests.serving_util import HANG_S, wait_for  # noqa: E402
from tests.test_live_router import REPLICA_ARGS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "test"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not serving either.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A local Ray cluster started by `ray start --head` in a process of its own. (ray.init's
    own local start forks Ray's daemons from this process with Python code between fork and
    exec; this process has JAX's and gRPC's threads by now, and a daemon whose child hung there
    never registered: "The current node timed out during startup".)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tmp_path_factory.mktemp("ray")
    # A loopback cluster of this test alone: no token (this process, its driver, has none).
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=5",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false", f"--temp-dir={temp}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        yield f"127.0.0.1:{port}"
    finally:
        # `ray start --block` leaves the daemons it started when signalled: `ray stop` ends them
        # (the only Ray cluster on the machine while this file runs: its tests run in one process).
        subprocess.run([ray_bin, "stop", "--force"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)
        head.kill()
        head.wait()
        if auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth


@pytest.fixture(scope="module")
def ray_cluster(ray_head):
    assert wait_for(lambda: _connect(ray_head), HANG_S), "the Ray head never took a driver"
    spec = cluster.ClusterSpec(name=NAME, server_args=tuple(REPLICA_ARGS), replica_cpus=1, router_cpus=0.5,
                               policy="round-robin", reconcile_s=0.2,
                               router_args=(("report_interval_s", 0.01), ("health_interval_s", 0.1)))
    router = cluster.start(spec, replicas=2)
    try:
        yield router
    finally:
        pids = [ray.get(ray.get_actor(n).pid.remote()) for n in cluster.replica_names(NAME)]
        cluster.shutdown(NAME, grace=2)
        ray.shutdown()
        assert not [p for p in pids if _alive(p)], "a replica's server outlived the cluster"


def _connect(address: str) -> bool:
    try:
        ray.init(address=address, namespace="jinfer-test", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}})
    except ConnectionError:  # the head is still starting
        return False
    return True


def _router_target(router) -> str:
    ports = ray.get(router.ports.remote())
    return f"{ports['host']}:{ports['port']}"


def _replica(k: int):
    return ray.get_actor(f"{NAME}-replica-{k}")


def test_two_ray_replicas_behind_the_router_serve_a_single_servers_greedy_tokens(ray_cluster):
    targets = ray.get(ray_cluster.targets.remote())
    assert len(targets) == 2 and targets == ray.get([_replica(k).target.remote() for k in (0, 1)])
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 4000) for _ in range(12 + i)] for i in range(4)]
    with Client(targets[1]) as single:
        want = [single.generate(p, max_tokens=8, ignore_eos=True)[0]["token_ids"] for p in prompts]
    with Client(_router_target(ray_cluster)) as c:
        got = [c.generate(p, max_tokens=8, ignore_eos=True)[0]["token_ids"] for p in prompts]
        stats = c.router_stats()
    assert got == want
    assert sorted(r.routed for r in stats.replicas) == [2, 2]  # round-robin: both replicas served


def test_a_killed_replica_actor_is_restarted_and_rejoins(ray_cluster):
    victim = _replica(0)
    old_target, old_pid = ray.get(victim.target.remote()), ray.get(victim.pid.remote())
    ray.kill(victim, no_restart=False)  # the actor's process dies; Ray starts it again
    assert wait_for(lambda: not _alive(old_pid), HANG_S), "the killed actor's server outlived it"
    new_target = ray.get(_replica(0).target.remote(), timeout=HANG_S)  # answers once restarted
    assert new_target != old_target
    assert wait_for(lambda: new_target in ray.get(ray_cluster.targets.remote()), HANG_S), "the router never took it in"
    assert old_target not in ray.get(ray_cluster.targets.remote())
    with Client(_router_target(ray_cluster)) as c:
        outs = [c.generate([5, 6, 7, i], max_tokens=3, ignore_eos=True)[0] for i in range(4)]
        assert all(len(o["token_ids"]) == 3 for o in outs)
        per_target = {r.target: r.routed for r in c.router_stats().replicas}
    assert per_target[new_target] >= 1  # traffic reaches the restarted replica


def test_the_cluster_scales_up_and_down_while_serving(ray_cluster):
    with Client(_router_target(ray_cluster)) as c:
        targets = cluster.scale(NAME, 3, timeout=HANG_S)
        assert len(targets) == 3
        added = _replica(2)
        added_pid = ray.get(added.pid.remote())
        for i in range(6):
            assert len(c.generate([9, 8, 7, i], max_tokens=2, ignore_eos=True)[0]["token_ids"]) == 2
        routed = {r.target: r.routed for r in c.router_stats().replicas}
        assert routed[ray.get(added.target.remote())] >= 1  # the new replica serves, cold
        targets = cluster.scale(NAME, 2, timeout=HANG_S)  # the newest leaves; its server drains and exits
        assert len(targets) == 2 and not _alive(added_pid)
        assert [n for n in cluster.replica_names(NAME)] == [
            f"{NAME}-replica-0", f"{NAME}-replica-1"]
        assert len(c.generate([1, 2, 3], max_tokens=2, ignore_eos=True)[0]["token_ids"]) == 2
    with pytest.raises(ValueError, match="replicas=0 must be >= 1"):
        cluster.scale(NAME, 0)
    with pytest.raises(ValueError, match="5 more replica\\(s\\) need 5 CPUs but the Ray cluster has [0-9.]+ free"):
        cluster.scale(NAME, 7)  # refused at once: Ray would wait for ever to place them
    assert len(ray.get(ray_cluster.targets.remote())) == 2


@pytest.mark.slow
def test_launch_cluster_tool_serves_scales_and_stops_cleanly(tmp_path):
    """The launcher end to end, with its own local Ray cluster: serving, SIGTERM drains and exits 0."""
    port_file = tmp_path / "ports.json"
    tool = os.path.join(ROOT, "tools", "launch_cluster.py")
    proc = subprocess.Popen([sys.executable, tool, "--replicas=2", "--port=0", "--policy=round-robin",
                             f"--port_file={port_file}", "--name=tool", "--namespace=jinfer-tool", *REPLICA_ARGS],
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert wait_for(port_file.exists, 600), "the launcher never served"
        import json
        ports = json.loads(port_file.read_text())
        with Client(f"{ports['host']}:{ports['port']}") as c:
            assert len(c.generate([4, 5, 6], max_tokens=3, ignore_eos=True)[0]["token_ids"]) == 3
            assert len(c.router_stats().replicas) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _placement_groups() -> int:
    """Placement groups holding resources now."""
    return sum(g["state"] == "CREATED" for g in ray.util.placement_group_table().values())


def test_a_replica_over_a_two_process_mesh_placed_by_ray_serves_tp2_tokens_and_restarts_whole(ray_cluster):
    from entrypoints.process import ServerProcess

    args = (*REPLICA_ARGS, "--config.model.tp=2")  # one device of each process
    spec = cluster.ClusterSpec(name="mesh", server_args=args, replica_cpus=0.5, hosts_per_replica=2,
                               placement="PACK", policy="round-robin", reconcile_s=0.2,
                               router_args=(("report_interval_s", 0.01), ("health_interval_s", 0.1)))
    prompts = [[20 + 3 * j + i for j in range(9 + 2 * i)] for i in range(3)]
    router = cluster.start(spec, replicas=1)
    try:
        replica = ray.get_actor("mesh-replica-0")
        pids = ray.get(replica.pids.remote())
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        with Client(_router_target(router)) as c:
            got = [c.generate(p, max_tokens=6, ignore_eos=True)[0]["token_ids"] for p in prompts]
        old_target = ray.get(replica.target.remote())
        os.kill(pids[1], signal.SIGKILL)  # a follower dies: the mesh ends, Ray restarts the replica whole
        assert wait_for(lambda: not any(_alive(p) for p in pids), HANG_S), "the mesh outlived its follower"
        # the old actor may answer until its watcher has ended it; a new mesh starts in its place
        assert wait_for(lambda: ray.get(replica.target.remote(), timeout=600) != old_target, 600)
        new_target = ray.get(replica.target.remote())
        assert wait_for(lambda: ray.get(router.targets.remote()) == [new_target], HANG_S)
        assert wait_for(lambda: _placement_groups() == 1, HANG_S), "the dead mesh's placement group is kept"
        with Client(_router_target(router)) as c:
            assert c.generate(prompts[0], max_tokens=6, ignore_eos=True)[0]["token_ids"] == got[0]
        pids = ray.get(replica.pids.remote())
    finally:
        cluster.shutdown("mesh", grace=2)
    assert not [p for p in pids if _alive(p)], "a mesh process outlived the cluster"
    assert wait_for(lambda: _placement_groups() == 0, HANG_S)
    with ServerProcess(list(args)) as single, Client(single.wait_ready(300).target) as c:
        assert got == [c.generate(p, max_tokens=6, ignore_eos=True)[0]["token_ids"] for p in prompts]
