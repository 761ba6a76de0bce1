"""Runtime resharding: move arrays to a new sharding, each device receiving only what it lacks.

For every target device the new shard is a box of the array. Old shards that the device
already holds supply their overlap locally; the rest of the box comes from other devices'
old shards, piece by piece. So the bytes moved are exactly the theoretical minimum:
sum over target devices of |new box| - |new box ∩ box it already holds|.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class MoveStats:
    """Bytes that crossed devices, the theoretical minimum, and what a full reload would send."""

    moved: int = 0
    minimum: int = 0
    full_reload: int = 0

    def __iadd__(self, other: "MoveStats") -> "MoveStats":
        self.moved += other.moved
        self.minimum += other.minimum
        self.full_reload += other.full_reload
        return self


def _box(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((s.start or 0, shape[i] if s.stop is None else s.stop) for i, s in enumerate(index))


def _intersect(a, b):
    out = tuple((max(lo1, lo2), min(hi1, hi2)) for (lo1, hi1), (lo2, hi2) in zip(a, b))
    return out if all(lo < hi for lo, hi in out) else None


def _size(box) -> int:
    return int(np.prod([hi - lo for lo, hi in box])) if box else 0


def minimum_bytes(x: jax.Array, target: jax.sharding.Sharding) -> int:
    """Bytes the target devices lack under x's current sharding."""
    old = {d: _box(i, x.shape) for d, i in x.sharding.devices_indices_map(x.shape).items()}
    total = 0
    for d, index in target.devices_indices_map(x.shape).items():
        box = _box(index, x.shape)
        have = _intersect(box, old[d]) if d in old else None
        total += (_size(box) - _size(have)) * x.dtype.itemsize
    return total


def _local(part, box) -> tuple[slice, ...]:
    """part (a sub-box of box) as slices of box's array."""
    return tuple(slice(lo - b_lo, hi - b_lo) for (lo, hi), (b_lo, _) in zip(part, box))


def _on_host(box, parts, shards, dtype, device) -> jax.Array:
    """The array of `box` on a CPU device, written from its pieces in host memory: a CPU device's
    memory is the host's, and numpy slices and copies compile nothing (the device path compiles
    a slice and a concatenate per shape and device: most of a regroup's pause on CPU). Two
    copies: into the new host array, and device_put's into the device's buffer."""
    out = np.empty([hi - lo for lo, hi in box], dtype)
    for part, src_box, src in parts:
        out[_local(part, box)] = np.asarray(shards[src].data)[_local(part, src_box)]
    return jax.device_put(out, device)


def _on_device(box, parts, shards, device) -> jax.Array:
    """The array of `box` on device from its pieces: each sliced on its source (lax.slice, one
    primitive), sent, and joined in one concatenate where they split the box along one axis
    (tensor parallelism's case), else written into zeros piece by piece."""
    pieces = []
    for part, src_box, src in parts:
        piece = shards[src].data
        if part != src_box:
            piece = jax.lax.slice(piece, [lo - s_lo for (lo, _), (s_lo, _) in zip(part, src_box)],
                                  [hi - s_lo for (_, hi), (s_lo, _) in zip(part, src_box)])
        pieces.append((part, piece if src == device else jax.device_put(piece, device)))
    if len(pieces) == 1:
        return pieces[0][1]
    split = [a for a in range(len(box)) if any(p[a] != box[a] for p, _ in pieces)]
    if len(split) == 1:
        return jnp.concatenate([x for _, x in sorted(pieces, key=lambda p: p[0][split[0]][0])], axis=split[0])
    out = jnp.zeros([hi - lo for lo, hi in box], pieces[0][1].dtype, device=device)
    for part, piece in pieces:
        out = out.at[_local(part, box)].set(piece)
    return out


def reshard_array(x: jax.Array, target: jax.sharding.Sharding, on_host: bool | None = None
                  ) -> tuple[jax.Array, MoveStats]:
    """x on `target`, built from local pieces first; returns the array and its move stats.
    on_host: assemble each new shard in host memory (None: on CPU devices, whose memory is the
    host's) or with device ops."""
    shards = {s.device: s for s in x.addressable_shards}
    sources: dict[tuple, list] = {}  # each distinct old box -> devices holding it
    for d, index in x.sharding.devices_indices_map(x.shape).items():
        sources.setdefault(_box(index, x.shape), []).append(d)
    stats = MoveStats(minimum=minimum_bytes(x, target))
    pieces_per_device = []
    for d, index in target.devices_indices_map(x.shape).items():
        box = _box(index, x.shape)
        stats.full_reload += _size(box) * x.dtype.itemsize
        parts = []  # (sub-box, the source's box, the source device)
        for src_box, holders in sources.items():
            part = _intersect(box, src_box)
            if part is None:
                continue
            src = d if d in holders else holders[0]
            parts.append((part, src_box, src))
            if part == box:  # one source covers the whole box
                parts = parts[-1:]
                break
        stats.moved += sum(_size(part) for part, _, src in parts if src != d) * x.dtype.itemsize
        kept = len(parts) == 1 and parts[0][0] == parts[0][1] and parts[0][2] == d  # a whole shard it holds
        if not kept and (d.platform == "cpu" if on_host is None else on_host):
            pieces_per_device.append(_on_host(box, parts, shards, x.dtype, d))
        else:
            pieces_per_device.append(_on_device(box, parts, shards, d))
    array = jax.make_array_from_single_device_arrays(x.shape, target, pieces_per_device)
    return array, stats


def reshard_tree(tree, targets) -> tuple[object, MoveStats]:
    """reshard_array over a pytree; `targets` holds a sharding where `tree` holds a subtree of
    arrays (e.g. one per nnx.Variable, as sharding.rules.state_shardings returns)."""
    total = MoveStats()

    def one(target, subtree):
        def leaf(x):
            y, stats = reshard_array(x, target)
            total.__iadd__(stats)
            return y
        return jax.tree.map(leaf, subtree)

    return jax.tree.map(one, targets, tree), total
