"""One engine over a mesh that spans several processes (hosts): the leader schedules, the
followers repeat its device work.

A multi-controller JAX program needs every process to launch the same device programs, in the
same order, on the same inputs. Scheduling is not deterministic across processes (requests
arrive over the network, deadlines and budgets read the clock), so only the leader (process 0)
runs the scheduler and the server. Its runner is a MirroredRunner: each call that launches
device work (a step) is first sent to every follower, which makes the same call on its own
runner (its own shard of the weights and of the KV pool) in `follow`. What a step
needs from the scheduler travels as the StepPlan the runner sees anyway, so a follower's
runner prepares the same arrays and picks the same program. Work that would move K/V through
the host (swapping to the host tier, migration, resharding, new weights) gathers arrays no
single process holds and is refused on such a mesh, naming the call.

The channel is one TCP connection from each follower to the leader (pickled messages). The
leader publishes its address and a fresh token in the jax.distributed key-value store; a
connection that does not prove the token is closed. Before anything is built, the leader also
publishes a digest of its launch config, and a follower launched with another refuses to start. A process that dies breaks the mesh: the
leader exits when a follower's connection closes, a follower when the leader's does, and either
exits when a call that launched on the other side fails on its own; a supervisor (jinfer's Ray
cluster, or a person) then restarts the replica as a whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import secrets
import socket
import struct
import sys
import threading
import time

from jinfer.errors import PlanRejected

log = logging.getLogger("jinfer.mirror")

_KEY = "jinfer/mirror/leader"
_CONFIG_KEY = "jinfer/mirror/config"
_FAILED_KEY = "jinfer/mirror/failed"
_OUTCOME_KEY = "jinfer/mirror/failed/outcome"  # "seen" (the leader) or "gave up" (the follower): set once
_HEADER = struct.Struct("!Q")
_HELLO = struct.Struct("!32sI")  # a follower's first bytes: the leader's token, its rank


class MeshError(ValueError):
    """A call the leader cannot mirror to its followers (its data would cross processes)."""


def _frame(message) -> bytes:
    """A message as its length-prefixed pickle (made once, sent to every follower)."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


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


def same_config(process_id: int, config_digest: str, timeout_s: float = 600.0) -> None:
    """Every process of a mesh must build the same engine (pool, buckets, programs): process 0
    publishes the digest of its launch config, the others compare theirs (ValueError when it
    differs). Call before building anything on the mesh."""
    client = _kv_client()
    if process_id == 0:
        client.key_value_set(_CONFIG_KEY, config_digest)
        _wait_for_followers(client, timeout_s)
        return
    digest = client.blocking_key_value_get(_CONFIG_KEY, int(timeout_s * 1000))
    if digest != config_digest:
        raise ValueError(f"process {process_id} was launched with another config than process 0 (digest "
                         f"{config_digest[:12]} vs {digest[:12]}): give every process of the mesh the same flags")
    client.key_value_set(f"{_CONFIG_KEY}/ok/{process_id}", "ok")


def _wait_for_followers(client, timeout_s: float) -> None:
    """The leader waits until every follower has checked its config (ValueError with a
    follower's reported failure; TimeoutError)."""
    pending = set(range(1, _num_processes()))
    deadline = time.monotonic() + timeout_s
    while pending:
        if (failed := _failure(client)) is not None:
            raise ValueError(f"a process of the mesh cannot start: {failed}")
        for rank in list(pending):
            try:
                client.key_value_try_get(f"{_CONFIG_KEY}/ok/{rank}")
                pending.discard(rank)
            except Exception:  # noqa: BLE001 - not yet
                pass
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"processes {sorted(pending)} of the mesh did not check in within {timeout_s:g}s")
        if pending:
            time.sleep(0.05)


def connect_followers(num_processes: int, host: str, timeout_s: float = 600.0) -> list[socket.socket]:
    """Leader side: listens on every interface, publishes `host` (the address the followers
    reach it at) with a fresh token, and accepts one connection per follower rank (1 ..
    num_processes - 1), each proving the token; anything else that connects is closed.
    Returns the followers' sockets in rank order."""
    token = secrets.token_hex(16)
    listener = socket.create_server(("", 0))
    listener.settimeout(1.0)  # between accepts: has a follower reported a failure?
    address = f"{host}:{listener.getsockname()[1]}"
    client = _kv_client()
    client.key_value_set(_KEY, f"{address} {token}")
    followers: dict[int, socket.socket] = {}
    deadline = time.monotonic() + timeout_s
    with listener:
        while len(followers) < num_processes - 1:
            try:
                sock, peer = listener.accept()
            except TimeoutError:
                if (failed := _failure(client)) is not None:
                    raise RuntimeError(f"a follower of the mesh failed to start: {failed}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(followers)} of {num_processes - 1} followers connected to "
                                       f"{address} in {timeout_s:g}s") from None
                continue
            rank = _handshake(sock, token, num_processes, followers)
            if rank is None:
                log.warning("closed a connection from %s that is not a follower of this mesh", peer)
                sock.close()
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            followers[rank] = sock
    return [followers[r] for r in sorted(followers)]


def report_failure(process_id: int, error: str, timeout_s: float = 60.0) -> None:
    """A follower that cannot start says why (the leader, waiting for it, stops waiting), then
    leaves the mesh. JAX's client aborts a process whose coordination service (the leader's)
    goes away, so in a mesh of two processes the follower waits for the leader to see the report
    and both leave jax.distributed together (shutdown's barrier): the leader's exit cannot then
    end the follower before it exits on its own. A leader that does not see it within timeout_s
    (still building) finds the follower gone. With more processes the follower leaves at once
    (a shutdown would wait for every process); the leader's exit then ends the others (JAX's
    client aborts them), as it may a follower that gave up and has not exited yet."""
    try:
        client = _kv_client()
        client.key_value_set(_FAILED_KEY, f"process {process_id}: {error}")
    except Exception:  # noqa: BLE001 - not joined yet, or the leader is gone: nobody waits
        log.debug("could not report the failure to the leader", exc_info=True)
        return
    if _num_processes() != 2:
        return
    try:
        client.blocking_key_value_get(_OUTCOME_KEY, int(timeout_s * 1000))
    except Exception:  # noqa: BLE001 - not seen in time: leave alone, unless the leader has just seen it
        if _claim(client, "gave up"):
            return
    _leave()


def _failure(client) -> str | None:
    """A follower's reported failure, or None. A leader that sees one in a mesh of two
    processes leaves jax.distributed together with that follower (report_failure) before it
    raises."""
    try:
        failed = client.key_value_try_get(_FAILED_KEY)
    except Exception:  # noqa: BLE001 - not set: nothing failed
        return None
    if _num_processes() == 2 and _claim(client, "seen"):
        _leave()
    return failed


def _num_processes() -> int:
    from jax._src import distributed  # not jax.process_count(): a follower that fails before
    return distributed.global_state.num_processes  # its backend starts has none


def _claim(client, outcome: str) -> bool:
    """Whether this side set the failure's outcome first (the key is set once; where the set
    fails, the key read back says whether it was this side's, as after a lost reply)."""
    try:
        client.key_value_set(_OUTCOME_KEY, outcome)
        return True
    except Exception:  # noqa: BLE001 - the other side did, or the call failed
        try:
            return client.key_value_try_get(_OUTCOME_KEY) == outcome
        except Exception:  # noqa: BLE001 - not set, or the leader is gone
            return False


def _leave() -> None:
    import jax

    try:
        jax.distributed.shutdown()
    except Exception:  # noqa: BLE001 - the process exits next in any case
        log.debug("leaving jax.distributed failed", exc_info=True)


def _handshake(sock: socket.socket, token: str, num_processes: int, taken) -> int | None:
    """The follower rank a new connection proves, or None. Its first bytes are the token and
    its rank (_HELLO: plain bytes, nothing a stranger sends is unpickled)."""
    sock.settimeout(10.0)
    try:
        hello = _recv_exact(sock, _HELLO.size)
    except OSError:
        return None
    sock.settimeout(None)
    if hello is None:
        return None
    got, rank = _HELLO.unpack(hello)
    if not secrets.compare_digest(got, token.encode()):
        return None
    return rank if 0 < rank < num_processes and rank not in taken else None


def connect_leader(process_id: int, timeout_s: float = 600.0) -> socket.socket:
    """Follower side: the connection to the leader, once it has published its address."""
    address, token = _kv_client().blocking_key_value_get(_KEY, int(timeout_s * 1000)).split(" ")
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    sock.settimeout(None)
    sock.sendall(_HELLO.pack(token.encode(), process_id))
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
        frame = _frame((op, args))
        try:
            with self._lock:
                for sock in self._followers:
                    sock.sendall(frame)
        except OSError:
            if op != "stop":
                _abandon(f"a follower could not be sent {op}")

    def dispatch(self, plan):
        # Launched here first: a plan the runner rejects (nothing launched) never reaches the
        # followers. Any other failure may have launched a program they will not run: the mesh
        # can no longer agree, so the process ends (its supervisor restarts the replica).
        try:
            handle = self._runner.dispatch(plan)
        except PlanRejected:
            raise
        except BaseException:
            _abandon("the step failed on the leader")
        self._mirror("dispatch", plan)
        return handle

    def execute(self, plan):
        return self.fetch(self.dispatch(plan))

    def close(self) -> None:
        """Tells the followers to exit (the leader is stopping)."""
        self._closing.set()
        self._mirror("stop")
        for sock in self._followers:
            with contextlib.suppress(OSError):  # a follower already gone
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
    _abandon(f"{who} of the mesh is gone")


def _abandon(why: str) -> None:
    """Ends this process: the mesh cannot go on (its collectives would wait for ever)."""
    log.error("%s: this process exits, its supervisor restarts the mesh", why, exc_info=sys.exc_info()[0] is not None)
    logging.shutdown()
    os._exit(1)


def follow(runner, sock: socket.socket) -> None:
    """Follower side: makes each call the leader's MirroredRunner sends on `runner`, in order,
    until the leader says stop (returns) or its connection closes (the process exits)."""
    while True:
        try:
            message = _recv(sock)
        except OSError:
            message = None
        if message is None:
            break
        op, args = message
        if op == "stop":
            sock.close()
            return
        try:
            getattr(runner, op)(*args)
        except BaseException:  # the leader's call succeeded: this process cannot follow any more
            _abandon(f"the mirrored {op} failed here")
    _abandon("the leader of the mesh is gone")
