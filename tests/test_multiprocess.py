"""A tp mesh over two processes (jax.distributed, gloo on loopback) against one process."""

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate(devices: int, *args: str) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")  # gloo collectives between CPU processes, also on a GPU machine
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "generate.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def _outputs(proc: subprocess.Popen) -> tuple[int, list[dict], str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, [json.loads(line) for line in out.splitlines()], err


def test_tp4_over_two_processes_matches_one_process(hf_checkpoints):
    # Vocabulary 300 is split over the 4 devices, the one KV head replicated: the step's
    # all-reduces and the LM head's all-gather cross the process boundary.
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
