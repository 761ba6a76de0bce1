"""Serves a model over gRPC (jinfer.v1.Inference) with Prometheus metrics, until SIGINT/SIGTERM.

  python -m entrypoints.serve                                   # configs/default.py
  python tools/launch_server.py --config=configs/llama3_8b.py --config.model.tp=2
  python tools/launch_server.py --config.cache.page_size=32 --config.serving.port=0 \
      --port_file=/tmp/jinfer.json                               # scripts read the bound ports

Every field of the config file can be overridden as --config.<section>.<field>=value; the
sections and their fields are documented in jinfer/launch.py (model, engine) and
jinfer/config.py / jinfer/serving/server.py (cache, scheduler, serving). The resolved config is
logged at start and reported by GetServerInfo (the bearer token redacted).

On SIGINT or SIGTERM the server stops admitting, lets in-flight streams finish for
serving.shutdown_grace_s, cancels the rest (freeing their pages) and exits 0.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time

from absl import app, flags

import configs
from entrypoints.process import define_mesh_flags, write_port_file
from jinfer.launch import define_config_flag, parse_flags, resolve, to_dict

FLAGS = flags.FLAGS
CONFIG = define_config_flag(os.path.join(os.path.dirname(configs.__file__), "default.py"))
flags.DEFINE_string("port_file", "", "Once serving, write {\"port\", \"http_port\", \"metrics_port\", \"pid\"} as "
                    "JSON here (for scripts that start the server with port 0; null: not served).")
define_mesh_flags()

log = logging.getLogger("jinfer.launch_server")


# Loaded in a thread while the engine builds (its program load and the weights' dequantizing
# leave the interpreter free): ~250 modules (grpc, the HTTP server, pydantic, prometheus), ~0.3 s
# that the server's start and its first request would otherwise spend.
_SERVING_MODULES = ("jinfer.serving.server", "anyio._backends._asyncio")


def _import_serving() -> None:
    try:
        for name in _SERVING_MODULES:
            importlib.import_module(name)
    except Exception:  # noqa: BLE001 - the server's own import raises it again, with its traceback
        log.debug("loading the serving modules ahead failed", exc_info=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    try:
        launch = resolve(CONFIG.value)
    except ValueError as e:
        sys.exit(f"error: {e}")
    log.info("resolved config:\n%s", json.dumps(to_dict(launch), indent=2))
    t0 = time.perf_counter()
    from entrypoints.build import build_engine, build_server  # jax and the engine load before the serving modules
    threading.Thread(target=_import_serving, name="import-serving", daemon=True).start()
    try:
        if FLAGS.num_processes > 1:
            _join_mesh(launch)
        engine = build_engine(launch, progress=FLAGS.process_id == 0)
        if FLAGS.num_processes > 1:
            engine = _mirror(engine)
    except (ValueError, FileNotFoundError, TimeoutError, RuntimeError) as e:
        _fail(f"error: {e}")
    if engine is None:
        return  # a follower of a mesh: the leader stopped
    info = engine.info()
    log.info("engine ready in %.1fs: %d KV pages of %d tokens, attention %s", time.perf_counter() - t0,
             info.num_pages, info.page_size, info.attention_backend)
    server = build_server(launch, engine)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        server.start()
    except RuntimeError as e:  # grpc could not bind the port
        sys.exit(f"error: {e}")
    if FLAGS.port_file:
        write_port_file(FLAGS.port_file, {"port": server.port, "http_port": server.http_port,
                                          "metrics_port": server.metrics_port})
    while not stop.wait(0.5):
        pass
    log.info("shutting down (grace %.1fs)", launch.serving.shutdown_grace_s)
    server.stop()
    if FLAGS.num_processes > 1:
        engine.runner.close()  # the followers exit
    if FLAGS.port_file and os.path.exists(FLAGS.port_file):
        os.remove(FLAGS.port_file)


def _fail(message: str) -> None:
    """Exits with `message`. A follower of a mesh prints it, then tells the leader (which waits
    for it) and leaves the mesh with it (mirror.report_failure); a process of a mesh then exits
    at once: jax.distributed's exit handler would wait for the other processes."""
    if FLAGS.num_processes == 1:
        sys.exit(message)
    print(message, file=sys.stderr, flush=True)
    if FLAGS.process_id != 0:
        from jinfer import mirror
        mirror.report_failure(FLAGS.process_id, message)
    logging.shutdown()
    os._exit(1)


def _join_mesh(launch) -> None:
    """Joins this process to the multi-process mesh (ValueError for a launch that cannot
    serve on one: the step's programs must span every process's devices; or for a follower
    launched with another config than process 0's)."""
    from sharding.distributed import initialize

    if launch.engine.instances:
        raise ValueError(f"engine.instances={launch.engine.instances} on a mesh over {FLAGS.num_processes} "
                         "processes: serve one engine (model.tp over every process's devices)")
    if launch.model.tp % FLAGS.num_processes:
        raise ValueError(f"model.tp={launch.model.tp} must be a multiple of --num_processes="
                         f"{FLAGS.num_processes}: every process holds an equal share of the mesh")
    initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from jinfer import mirror

    built = {k: v for k, v in to_dict(launch).items() if k != "serving"}  # only the leader serves
    mirror.same_config(FLAGS.process_id, hashlib.sha256(json.dumps(built, sort_keys=True).encode()).hexdigest())


def _mirror(engine):
    """The leader's engine with its runner mirrored to the followers; on a follower, repeats
    the leader's device work until it stops, and returns None (jinfer.mirror). TimeoutError
    when the other side does not connect in time."""
    from jinfer import mirror

    host = FLAGS.coordinator_address.rpartition(":")[0]
    if FLAGS.process_id != 0:
        engine.release_warmup()  # compiles what the leader's steps will run, as the leader does
        log.info("following the leader at %s", host)
        mirror.follow(engine.runner, mirror.connect_leader(FLAGS.process_id))
        engine.stop_warmup()  # a compilation under way ends before the interpreter does
        return None
    engine.runner = mirror.MirroredRunner(engine.runner, mirror.connect_followers(FLAGS.num_processes, host))
    log.info("leading a mesh of %d processes", FLAGS.num_processes)
    return engine


def run() -> None:
    """The entry point (python -m entrypoints.serve, tools/launch_server.py)."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
