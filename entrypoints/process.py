"""A jinfer server (python -m entrypoints.serve) or router (python -m entrypoints.router) as a
child process:
started with port 0, ready once it writes its port file, stopped with SIGTERM (it drains and
exits 0). The demo, the live routing benchmark and the tests start their servers this way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

SERVER = "entrypoints.serve"
# The source tree holding jinfer/, scheduler/ and configs/: children find them without an install.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_mesh_flags() -> None:
    """The flags of one process of a mesh over several processes (hosts): the same on every
    process but --process_id (tools/generate.py, the server)."""
    from absl import flags
    flags.DEFINE_string("coordinator_address", "127.0.0.1:12355",
                        "host:port of process 0, which coordinates a multi-process mesh.")
    flags.DEFINE_integer("num_processes", 1, "Processes (hosts) in the mesh; 1 = this process alone.",
                         lower_bound=1)
    flags.DEFINE_integer("process_id", 0, "This process's rank in [0, num_processes).", lower_bound=0)


def write_port_file(path: str, ports: dict) -> None:
    """Writes `ports` and this process's pid as JSON to path, atomically: the file a
    ServerProcess waits for (readers never see half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({**ports, "pid": os.getpid()}, f)
    os.replace(tmp, path)


def wait_for_stop_signal() -> None:
    """Blocks until SIGINT or SIGTERM (a main's serving loop; call from the main thread)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    while not stop.wait(0.5):
        pass


class ServerProcess:
    """ServerProcess(["--config=...", "--config.cache.num_pages=64"]).start().wait_ready()

    module: the entry point run as `python -m module` (entrypoints.serve, or a router's such as
    entrypoints.router; both take --port_file). cpus: pin the process
    to these CPU cores (os.sched_setaffinity; None: no pinning). stdout/stderr: where its log
    goes (default: this process's stderr). die_with_parent: the child gets SIGTERM (and drains)
    when the thread that started it exits, even if that process is killed (Linux
    PR_SET_PDEATHSIG; a Ray actor's server must not outlive the actor). host: the address
    `target` names (the interface the server binds). env: variables set for the child on top
    of this process's."""

    def __init__(self, args: list[str], *, module: str = SERVER, cpus: set[int] | None = None,
                 stdout=None, die_with_parent: bool = False, host: str = "127.0.0.1", env: dict | None = None):
        self.args, self.module, self.cpus, self.host = list(args), module, cpus, host
        self.env = dict(env or {})
        self.die_with_parent = die_with_parent
        self.stdout = stdout if stdout is not None else sys.stderr
        self._tmp = tempfile.TemporaryDirectory(prefix="jinfer-proc-")
        self.port_file = os.path.join(self._tmp.name, "ports.json")
        self.proc: subprocess.Popen | None = None
        self.ports: dict = {}

    def start(self) -> "ServerProcess":
        cmd = [sys.executable, "-m", self.module, f"--port_file={self.port_file}", *self.args]
        # Set by the child itself before it execs the tool (no fork-time hook in a threaded parent).
        setup = []
        if self.cpus:
            setup.append(f"os.sched_setaffinity(0, {sorted(self.cpus)})")
        if self.die_with_parent:  # PR_SET_PDEATHSIG (1) survives the exec; a parent gone before it was set: exit
            setup.append("import ctypes, signal; ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)")
            setup.append(f"os.getppid() == {os.getpid()} or os._exit(1)")
        if setup:
            code = "; ".join(["import os, sys", *setup, "os.execv(sys.argv[1], sys.argv[1:])"])
            cmd = [sys.executable, "-c", code, *cmd]
        path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(cmd, stdout=self.stdout, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env, "PYTHONPATH": path})
        return self

    def wait_ready(self, timeout: float = 600.0) -> "ServerProcess":
        """Blocks until the port file appears; RuntimeError if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited with code {self.proc.returncode} before serving "
                                   "(its log is above)")
            if os.path.exists(self.port_file):
                with open(self.port_file) as f:
                    self.ports = json.load(f)
                return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"{self.module} was not serving after {timeout:.0f}s")

    @property
    def port(self) -> int:
        return self.ports["port"]

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def http_port(self) -> int | None:
        """The OpenAI-compatible HTTP API's port (None: the process serves none)."""
        return self.ports.get("http_port")

    @property
    def http_target(self) -> str | None:
        """host:port of the HTTP API (its base URL is http://<http_target>/v1), or None."""
        return None if self.http_port is None else f"{self.host}:{self.http_port}"

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait (kill after timeout); returns the exit code."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._tmp.cleanup()
        return self.proc.returncode if self.proc is not None else 0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc):
        self.stop()
