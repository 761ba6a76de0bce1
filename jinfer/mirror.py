"""One engine over a mesh that spans several processes (hosts): the leader schedules, the
followers repeat its device work.

A multi-controller JAX program needs every process to launch the same device programs, in the
same order, on the same inputs. Scheduling is not deterministic across processes (requests
arrive over the network, deadlines and budgets read the clock), so only the leader (process 0)
runs the scheduler and the server. Its runner is a MirroredRunner: each call that launches
device work (a step, a K/V move) is first sent to every follower, which makes the same call
on its own runner (its own shard of the weights and of the KV pool) in `follow`. What a step
needs from the scheduler travels as the StepPlan the runner sees anyway, so a follower's
runner prepares the same arrays and picks the same program. Work that would move K/V through
the host (swapping to the host tier, migration, resharding, new weights) gathers arrays no
single process holds and is refused on such a mesh, naming the call.

The channel is one TCP connection from each follower to the leader (pickled messages; the
processes of one replica trust each other as they share a JAX cluster); the leader's address
goes through the jax.distributed key-value store. A process that dies breaks the mesh: the
leader exits when a follower's connection closes, a follower when the leader's does, so a
supervisor (jinfer's Ray cluster, or a person) restarts the replica as a whole.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import struct
import threading

log = logging.getLogger("jinfer.mirror")

_KEY = "jinfer/mirror/leader"
_HEADER = struct.Struct("!Q")


class MeshError(ValueError):
    """A call the leader cannot mirror to its followers (its data would cross processes)."""


def _send(sock: socket.socket, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket):
    """The next message, or None when the peer closed the connection."""
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    data = _recv_exact(sock, _HEADER.unpack(header)[0])
    return None if data is None else pickle.loads(data)


def _kv_client():
    from jax._src import distributed  # the client jax.distributed.initialize made
    if distributed.global_state.client is None:
        raise RuntimeError("jax.distributed is not initialized: sharding.distributed.initialize first")
    return distributed.global_state.client


def connect_followers(num_processes: int, host: str = "", timeout_s: float = 600.0) -> list[socket.socket]:
    """Leader side: listens on `host` (default: this machine's name), publishes the address
    and accepts one connection per follower (num_processes - 1 of them)."""
    listener = socket.create_server((host or "0.0.0.0", 0))
    listener.settimeout(timeout_s)
    address = f"{host or socket.gethostbyname(socket.gethostname())}:{listener.getsockname()[1]}"
    _kv_client().key_value_set(_KEY, address)
    followers = []
    with listener:
        while len(followers) < num_processes - 1:
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                raise TimeoutError(f"{len(followers)} of {num_processes - 1} followers connected to {address} "
                                   f"in {timeout_s:g}s") from None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)
            followers.append(sock)
    return followers


def connect_leader(timeout_s: float = 600.0) -> socket.socket:
    """Follower side: the connection to the leader, once it has published its address."""
    address = _kv_client().blocking_key_value_get(_KEY, int(timeout_s * 1000))
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    sock.settimeout(None)
    return sock


class MirroredRunner:
    """The leader's runner: a ModelRunner whose device-launching calls are sent to the
    followers before they run here. Everything else is the wrapped runner's."""

    def __init__(self, runner, followers: list[socket.socket]):
        self._runner = runner
        self._followers = followers
        self._lock = threading.Lock()
        self._closing = threading.Event()
        for sock in followers:
            threading.Thread(target=_exit_when_closed, args=(sock, "a follower", self._closing), daemon=True,
                             name="mirror-watch").start()

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def _mirror(self, op: str, *args) -> None:
        with self._lock:
            for sock in self._followers:
                _send(sock, (op, args))

    def dispatch(self, plan):
        self._mirror("dispatch", plan)
        return self._runner.dispatch(plan)

    def move_kv(self, moves) -> None:
        if moves:
            self._mirror("move_kv", list(moves))
        self._runner.move_kv(moves)

    def execute(self, plan):
        return self.fetch(self.dispatch(plan))

    def close(self) -> None:
        """Tells the followers to exit (the leader is stopping)."""
        self._closing.set()
        self._mirror("stop")
        for sock in self._followers:
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _refuse(self, what: str):
        raise MeshError(f"{what} is not supported on a mesh over several processes (its K/V or weights "
                        "would pass through one host)")

    def read_pages(self, pages):
        self._refuse("reading K/V pages to the host (swap, migration)")

    def write_pages(self, pages, data):
        self._refuse("writing K/V pages from the host (swap, migration)")

    def reshard(self, layout):
        self._refuse("resharding")

    def set_weights(self, state):
        self._refuse("new weights")

    def precompile(self, layout):
        self._refuse("precompiling for another mesh")


def _exit_when_closed(sock: socket.socket, who: str, closing: threading.Event) -> None:
    """Blocks until the peer closes `sock` (followers never send), then ends this process: the
    mesh lost a member and no further step can complete."""
    try:
        while sock.recv(1 << 16):
            pass
    except OSError:
        pass
    if closing.is_set():  # MirroredRunner.close: a clean stop
        return
    log.error("%s of the mesh is gone: this process exits (its collectives could never complete)", who)
    logging.shutdown()
    os._exit(1)


def follow(runner, sock: socket.socket) -> None:
    """Follower side: makes each call the leader's MirroredRunner sends on `runner`, in order,
    until the leader says stop (returns) or its connection closes (the process exits)."""
    while (message := _recv(sock)) is not None:
        op, args = message
        if op == "stop":
            sock.close()
            return
        try:
            getattr(runner, op)(*args)
        except Exception:  # noqa: BLE001 - the leader's same call failed the same way (a rejected plan)
            log.exception("mirrored %s failed", op)
    log.error("the leader of the mesh is gone: this process exits")
    logging.shutdown()
    os._exit(1)
