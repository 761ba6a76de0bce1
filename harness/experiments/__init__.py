"""The experiments API: the measurements behind the research notebooks (notebooks/) and the
benchmark tools that share them.

- `tensor_parallel`: one model's step at several tp layouts (latency, throughput, memory per
  device, bytes its collectives move); `hlo` reads those bytes from a compiled program.
- `partitions`: a host's devices split into engine instances serving one workload, and
  regrouped under load.
- `report`: tables and CDFs for the notebooks.
- `notebooks`: runs a notebook top to bottom in a fresh kernel (needs the `test` extra).
- `routing`: the routing policies compared in the simulator on Preble's workloads (the
  prefix-routing notebook).

Every study has a "small" size (seconds: what the tests run) and a "full" one (the committed
outputs); a notebook reads its size from JINFER_NOTEBOOK_SIZE.
"""

from __future__ import annotations

import os

SIZES = ("small", "full")
SIZE_VARIABLE = "JINFER_NOTEBOOK_SIZE"
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def notebook_size(default: str = "full") -> str:
    """The study size a notebook runs at: $JINFER_NOTEBOOK_SIZE, else `default`."""
    size = os.environ.get(SIZE_VARIABLE, default)
    if size not in SIZES:
        raise ValueError(f"{SIZE_VARIABLE}={size!r} must be one of {SIZES}")
    return size


def use_fake_devices(n: int = 8) -> None:
    """Asks XLA for n CPU devices (the tp meshes of the studies need 8), unless XLA_FLAGS already
    sets a count. Takes effect only before JAX starts its backend: call it before importing jax."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _DEVICE_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_FLAG}={n}".strip()


def describe_host() -> str:
    """One line: JAX version, device kind and count, host CPU cores and their load (timings
    taken on a shared machine are only as quiet as it was)."""
    import jax
    d = jax.devices()
    return (f"jax {jax.__version__}, {len(d)} x {d[0].device_kind} ({d[0].platform}) devices, "
            f"{os.cpu_count()} host CPU cores, load average {os.getloadavg()[0]:.1f}")
