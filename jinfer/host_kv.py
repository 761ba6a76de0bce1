"""The host KV tier: paused requests' K/V swapped out of the device pool (jinfer.pausing).

A swap-out keeps what ModelRunner.read_pages gathered (the request's pages, every layer) in
host memory: each array moves to its devices' `pinned_host` memory kind (same sharding, so
under tensor parallelism each device's heads stay with that device's host memory, and the
copy back is a DMA), or stays where it is on a platform without host memory kinds. A swap-in
hands the data to ModelRunner.write_pages, which moves it back into device pages.

A request swapped out in chunks over several steps (the step's swap budget, jinfer.pausing)
has one entry per chunk; a swap-in takes them back last chunk first.
"""

from __future__ import annotations

import jax


def _to_host(x: jax.Array) -> jax.Array:
    try:
        return jax.device_put(x, x.sharding.with_memory_kind("pinned_host"))
    except (ValueError, NotImplementedError):  # no host memory kinds on this platform
        return x


class HostKVTier:
    """Swapped K/V by request id: its chunks, in the order they were put."""

    def __init__(self):
        self._data: dict[str, list] = {}
        self.swapped_out = 0  # pages copied to the host, ever
        self.swapped_in = 0  # pages copied back

    def put(self, request_id: str, data, num_pages: int) -> None:
        """Keeps read_pages output for request_id in host memory (the copy is dispatched, not
        waited for), as its next chunk."""
        chunk = (jax.tree.map(_to_host, data), jax.tree.map(lambda x: x.sharding, data))
        self._data.setdefault(request_id, []).append(chunk)
        self.swapped_out += num_pages

    def take(self, request_id: str, num_pages: int):
        """The last chunk put for request_id (and not taken), back in device memory where it
        came from."""
        self.swapped_in += num_pages
        chunks = self._data[request_id]
        data, shardings = chunks.pop()
        if not chunks:
            del self._data[request_id]
        return jax.tree.map(jax.device_put, data, shardings)

    def held(self, request_id: str):
        """What request_id's last swap-out chunk keeps (host memory; for inspection)."""
        return self._data[request_id][-1][0]

    def drop(self, request_id: str) -> None:
        self._data.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._data

    def __len__(self) -> int:
        return len(self._data)

    @property
    def nbytes(self) -> int:
        """Bytes held (the gathered pages, power-of-two padding included)."""
        return sum(a.nbytes for chunks in self._data.values() for d, _ in chunks for a in jax.tree.leaves(d))
