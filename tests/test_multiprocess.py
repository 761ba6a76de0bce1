"""A tp mesh over two processes (jax.distributed, gloo on loopback) against one process."""

import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILES = "--xla_backend_optimization_level=0"  # as every test compiles (the Makefile's XLA_TEST_FLAGS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate(devices: int, *args: str) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILES}",
               JAX_PLATFORMS="cpu")  # gloo collectives between CPU processes, also on a GPU machine
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "generate.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def _outputs(proc: subprocess.Popen) -> tuple[int, list[dict], str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, [json.loads(line) for line in out.splitlines()], err


@pytest.mark.slow  # the server over two processes (below) checks a cross-process tp mesh's tokens by default
def test_tp4_over_two_processes_matches_one_process(hf_checkpoints):
    # Vocabulary 300 is split over the 4 devices, the one KV head replicated: the step's
    # all-reduces and the LM head's all-gather cross the process boundary. Every process runs
    # the whole engine here (tools/generate.py: the same requests in the same order).
    common = [f"--config.model.path={hf_checkpoints['llama3']}", "--prompt=def f(x):", "--prompt=hello",
              "--max_tokens=6", "--json", "--config.model.tp=4", "--config.scheduler.max_model_len=64",
              "--config.cache.num_pages=32", "--config.engine.compilation_cache="]
    cluster = [f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2"]
    procs = [_generate(2, *common, *cluster, f"--process_id={i}") for i in range(2)]
    results = [_outputs(p) for p in procs]
    single = _outputs(_generate(4, *common))
    for rc, _, err in results + [single]:
        assert rc == 0, err
    assert results[1][1] == []  # only process 0 prints
    tokens = [r["token_ids"] for r in results[0][1]]
    assert tokens == [r["token_ids"] for r in single[1]] and all(len(t) == 6 for t in tokens)


def test_cluster_flags_are_checked_before_connecting():
    for flags, message in [(["--num_processes=2", "--process_id=2"], "process_id=2 must be in [0, num_processes=2)"),
                           (["--num_processes=2", "--coordinator_address=nohost"],
                            "coordinator_address='nohost' must be host:port")]:
        rc, _, err = _outputs(_generate(1, "--prompt=x", *flags))
        assert rc != 0 and message in err


class _Logged:
    """A ServerProcess whose log goes to a file (output() reads it)."""

    def __init__(self, args: list[str], env: dict):
        from entrypoints.process import ServerProcess

        self._log = tempfile.TemporaryFile()
        self.server = ServerProcess(args, env=env, stdout=self._log).start()
        self.proc = self.server.proc

    def __getattr__(self, name):
        return getattr(self.server, name)

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")


def _mesh_servers(args: list[str], follower_args: list[str] = ()) -> list:
    """A server over a 2-process mesh on loopback (one fake device each): [leader, follower]."""
    mesh = [f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2"]
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {FAST_COMPILES}", "JAX_PLATFORMS": "cpu"}
    return [_Logged([*args, *mesh, f"--process_id={i}", *(follower_args if i else ())], env) for i in range(2)]


def test_a_server_over_two_processes_serves_one_processs_tokens_and_stops_both():
    from entrypoints.process import ServerProcess
    from jinfer.serving.client import Client
    from tests.test_live_router import REPLICA_ARGS

    # Tree drafts (always drafting): their verification and the accepted path's K/V moves are
    # mirrored too.
    args = [*REPLICA_ARGS, "--config.model.tp=2", "--config.speculation.method=suffix",
            "--config.speculation.tree=True", "--config.speculation.adaptive=False"]
    prompts = [[11 + 7 * (j % 5) + i for j in range(10 + 3 * i)] for i in range(4)]  # repeating: drafts
    leader, follower = _mesh_servers(args)
    try:
        leader.wait_ready(300)
        with Client(leader.target) as c:
            outs = [c.generate(p, max_tokens=8, ignore_eos=True)[0] for p in prompts]
            got = [o["token_ids"] for o in outs]
            assert sum(o["usage"].get("accepted_draft_tokens", 0) for o in outs) > 0
            # several at once: mixed prefill and decode steps, batched
            batch = [o["token_ids"] for o in c.generate(prompts[0], max_tokens=5, n=3, temperature=1.0, seed=3)]
        assert leader.stop() == 0  # SIGTERM drains the leader, which tells the follower to exit
        assert follower.proc.wait(timeout=60) == 0
    finally:
        leader.kill()
        follower.kill()
    single = ServerProcess(args, env={"XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {FAST_COMPILES}",
                                      "JAX_PLATFORMS": "cpu"}).start()
    try:
        with Client(single.wait_ready(300).target) as c:
            assert got == [c.generate(p, max_tokens=8, ignore_eos=True)[0]["token_ids"] for p in prompts]
            assert batch == [o["token_ids"] for o in c.generate(prompts[0], max_tokens=5, n=3, temperature=1.0, seed=3)]
    finally:
        single.stop()


@pytest.mark.parametrize("victim", [0, 1])
def test_a_mesh_server_ends_when_another_of_its_processes_dies(victim):
    from tests.test_live_router import REPLICA_ARGS

    procs = _mesh_servers([*REPLICA_ARGS, "--config.model.tp=2"])
    try:
        procs[0].wait_ready(300)
        procs[victim].proc.kill()
        assert procs[1 - victim].proc.wait(timeout=120) == 1  # its steps could never complete: it ends
    finally:
        for p in procs:
            p.kill()


def test_a_follower_launched_with_another_config_refuses_to_start():
    from tests.test_live_router import REPLICA_ARGS

    args = [*REPLICA_ARGS, "--config.model.tp=2"]
    leader, follower = _mesh_servers(args, follower_args=["--config.scheduler.max_num_seqs=4"])
    try:
        assert follower.proc.wait(timeout=120) == 1
        assert "was launched with another config than process 0" in follower.output()
        assert leader.proc.wait(timeout=120) == 1  # told, it stops waiting for the follower
        assert "a process of the mesh cannot start: process 1: error: process 1 was launched" in leader.output()
    finally:
        leader.kill()
        follower.kill()


_REFUSE = """
import os, sys
from sharding.distributed import initialize
from jinfer import mirror
rank, late = int(sys.argv[1]), sys.argv[3] == "late"
initialize(sys.argv[2], 2, rank)
try:
    if rank == 0 and late:  # a leader busy (building) while its follower fails
        client = mirror._kv_client()
        client.key_value_set(mirror._CONFIG_KEY, "digest-0")
        sys.stdin.readline()  # the test: the follower has exited
        print("outcome:", client.key_value_try_get(mirror._OUTCOME_KEY), flush=True)
        mirror._wait_for_followers(client, 60)
    else:
        mirror.same_config(rank, "digest-" + str(rank))
except ValueError as e:
    print(e, flush=True)
    if rank:
        mirror.report_failure(rank, str(e), timeout_s=0.5 if late else 60)
        if not late:
            sys.stdin.readline()  # held up before its exit (a busy machine) until the test has seen the leader exit
        print("the follower exits on its own", flush=True)
os._exit(1)
"""


def _refusing(late: bool) -> list[subprocess.Popen]:
    address = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILES}")
    return [subprocess.Popen([sys.executable, "-c", _REFUSE, str(rank), address, "late" if late else "prompt"],
                             cwd=ROOT, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT) for rank in (0, 1)]


def test_a_follower_that_refuses_to_start_is_not_ended_by_the_leaders_exit():
    # The leader exits as soon as it has seen the report. JAX's client aborts a process whose
    # coordination service goes away, so the two leave jax.distributed together first.
    procs = _refusing(late=False)
    leader, _ = procs[0].communicate(timeout=120)
    follower, _ = procs[1].communicate("go\n", timeout=120)  # alive after the leader's exit
    assert [p.returncode for p in procs] == [1, 1], follower
    assert "a process of the mesh cannot start: process 1: process 1 was launched" in leader
    assert "the follower exits on its own" in follower
    # A leader that does not see the report in time (busy building): the follower leaves alone,
    # and the leader, seeing it later, exits without waiting for it (no shutdown barrier).
    procs = _refusing(late=True)
    follower, _ = procs[1].communicate(timeout=120)
    assert procs[1].returncode == 1 and "the follower exits on its own" in follower, follower
    leader, _ = procs[0].communicate("go\n", timeout=120)
    assert procs[0].returncode == 1 and "outcome: gave up" in leader, leader
    assert "a process of the mesh cannot start: process 1: process 1 was launched" in leader


def test_a_mesh_server_refuses_a_tp_its_processes_cannot_share():
    from entrypoints.process import ServerProcess
    from tests.test_live_router import REPLICA_ARGS

    proc = ServerProcess([*REPLICA_ARGS, "--config.model.tp=3", "--num_processes=2", "--process_id=0"],
                         stdout=subprocess.PIPE).start()
    out = proc.proc.communicate(timeout=120)[0].decode()
    assert proc.proc.returncode != 0
    assert "model.tp=3 must be a multiple of --num_processes=2" in out
