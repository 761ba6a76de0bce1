"""Shared fixtures: tiny HF checkpoints built locally with transformers' save_pretrained, and a
gRPC client of a module's server."""

import os

# 8 fake CPU devices for sharding tests, and the Makefile's faster compiles; must be set before
# JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")

import pytest  # noqa: E402

from jinfer.serving.client import Client  # noqa: E402
from tests import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """Variant name -> directory holding config.json, model.safetensors and tokenizer files."""
    root = tmp_path_factory.mktemp("hf")
    return {name: hf_models.save_tiny(name, str(root / name)) for name in hf_models.VARIANTS}


@pytest.fixture
def client(server):
    """A gRPC client of the test module's `server` fixture (a module may define its own)."""
    with Client(f"127.0.0.1:{server.port}") as c:
        yield c


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the session, shared by its pytest-xdist workers:
    the many engines the tests build compile the same step programs; after the first (in
    either worker), each is a disk read. A size limit turns on JAX's file lock around the
    cache's reads and writes, so one worker never reads an entry the other is writing."""
    import jax

    from jinfer.engine import enable_compilation_cache
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' basetemps are siblings in the session's directory
    path = root / "xla-cache"
    path.mkdir(exist_ok=True)
    enable_compilation_cache(str(path))
    jax.config.update("jax_compilation_cache_max_size", 8 << 30)
