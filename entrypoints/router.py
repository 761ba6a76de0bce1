"""Routes requests across jinfer replica servers (tools/launch_server.py) with a routing policy,
until SIGINT/SIGTERM. Clients talk to the router as to one server (jinfer.v1.Inference, and with
--http_port the OpenAI-compatible HTTP API, each request routed as a Generate is);
`tools/client.py --router_stats` shows what the policy sees.

  python tools/launch_server.py --config.serving.port=50061 --config.serving.metrics_port=9091 &
  python tools/launch_server.py --config.serving.port=50062 --config.serving.metrics_port=9092 &
  python tools/profile_engine.py --out=cost.json                   # the replicas' step costs
  python tools/launch_router.py --replicas=127.0.0.1:50061,127.0.0.1:50062 \
      --policy=preble-e2 --cost_model=cost.json --port=50051 --http_port=8000

Policies (scheduler/routing/policies.py): round-robin, least-load, sglang (SGLang's cache-aware router),
preble-e2 (Preble's E2 over a global radix tree; needs --cost_model). Replicas report their load
and prefix-cache evictions to the router over WatchReplica. A replica whose watch stream ends,
whose Generate fails with UNAVAILABLE or whose health checks fail is routed around until it
answers again (--health_interval_s, --health_timeout_s, --health_failures); a request it failed
before streaming anything goes to another replica (--max_reroutes).
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags

from entrypoints.process import wait_for_stop_signal, write_port_file
from scheduler.routing.policies import ROUTERS

FLAGS = flags.FLAGS
flags.DEFINE_list("replicas", [], "Replica servers, host:port, comma-separated (at least one).")
flags.DEFINE_enum("policy", "preble-e2", ROUTERS, "Routing policy.")
flags.DEFINE_string("cost_model", "", "Cost model JSON for preble-e2 (tools/profile_engine.py, run with the "
                    "replicas' launch config).")
flags.DEFINE_string("host", "127.0.0.1", "Interface the router binds.")
flags.DEFINE_integer("port", 50051, "Router port (0 picks a free one; see --port_file).", lower_bound=0,
                     upper_bound=65535)
flags.DEFINE_integer("http_port", None, "Serve the OpenAI-compatible HTTP API on this port too (0 picks a free "
                     "one; unset: no HTTP API).", lower_bound=0, upper_bound=65535)
flags.DEFINE_string("port_file", "", "Once serving, write {\"port\", \"http_port\", \"pid\"} as JSON here "
                    "(http_port null without --http_port).")
flags.DEFINE_string("tokenizer", "auto", "Encodes text prompts: auto = the model the replicas' launch config "
                    "names; a model directory with tokenizer.json; none = token-id prompts only.")
flags.DEFINE_string("auth_token", None, "Clients must send `authorization: Bearer <token>`.")
flags.DEFINE_string("replica_token", None, "Bearer token sent to the replicas (their serving.auth_token).")
flags.DEFINE_float("report_interval_s", 0.05, "Replicas report load at most this often.", lower_bound=1e-3)
flags.DEFINE_float("connect_timeout_s", 300.0, "Wait this long for the replicas to answer at start.",
                   lower_bound=0.1)
flags.DEFINE_float("shutdown_grace_s", 10.0, "In-flight streams get this long on shutdown.", lower_bound=0)
flags.DEFINE_float("health_interval_s", 1.0, "Check every replica's health this often (and reconnect a down one).",
                   lower_bound=1e-3)
flags.DEFINE_float("health_timeout_s", 1.0, "Deadline of one health check.", lower_bound=1e-3)
flags.DEFINE_integer("health_failures", 3, "Failed health checks in a row that mark a replica down.", lower_bound=1)
flags.DEFINE_integer("max_reroutes", 2, "Route a request again at most this many times when its replica fails before "
                     "streaming anything.", lower_bound=0)
flags.DEFINE_integer("max_paused_requests", 100_000, "Requests paused at a tool call whose replica the router "
                     "remembers for their Resume (past this the oldest are forgotten).", lower_bound=1)
flags.DEFINE_float("window_s", 180.0, "preble-e2: history window H for loads and prefix hits.", lower_bound=1e-3)
flags.DEFINE_bool("rebalance", True, "preble-e2: leave an overloaded cache holder (1.5x the lightest load).")
flags.DEFINE_bool("replicate", True, "preble-e2: copy a prefix whose TTFT doubled to another replica.")
flags.DEFINE_bool("pd_balance", True, "preble-e2: send miss-heavy requests toward decode-dominated replicas.")

log = logging.getLogger("jinfer.launch_router")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    from entrypoints.routing import router_server
    from jinfer.router.config import RouterConfig
    from scheduler.cost_model import CostModel
    from scheduler.routing.policies import E2Options

    if not FLAGS.replicas:
        sys.exit("error: --replicas is empty: give the replica servers as host:port,host:port")
    cost = None
    if FLAGS.cost_model:
        try:
            cost = CostModel.load(FLAGS.cost_model)
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"error: --cost_model={FLAGS.cost_model!r}: {e}")
    tokenizer = FLAGS.tokenizer
    if tokenizer == "none":
        tokenizer = None
    elif tokenizer != "auto":
        from jinfer.tokenizer import Tokenizer
        try:
            tokenizer = Tokenizer.from_dir(tokenizer)
        except ValueError as e:
            sys.exit(f"error: --tokenizer: {e}")
    try:
        config = RouterConfig(host=FLAGS.host, port=FLAGS.port, http_port=FLAGS.http_port,
                              auth_token=FLAGS.auth_token, replica_token=FLAGS.replica_token,
                              report_interval_s=FLAGS.report_interval_s,
                              connect_timeout_s=FLAGS.connect_timeout_s, shutdown_grace_s=FLAGS.shutdown_grace_s,
                              health_interval_s=FLAGS.health_interval_s, health_timeout_s=FLAGS.health_timeout_s,
                              health_failures=FLAGS.health_failures, max_reroutes=FLAGS.max_reroutes,
                              max_paused_requests=FLAGS.max_paused_requests)
        options = E2Options(window_s=FLAGS.window_s, rebalance=FLAGS.rebalance, replicate=FLAGS.replicate,
                            pd_balance=FLAGS.pd_balance)
        router = router_server(FLAGS.replicas, FLAGS.policy, cost, options, config, tokenizer)
        log.info("waiting for %d replicas: %s", len(FLAGS.replicas), ", ".join(FLAGS.replicas))
        router.start()
    except (ValueError, ConnectionError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    log.info("router config: %s", json.dumps(router.describe()))
    if FLAGS.port_file:
        write_port_file(FLAGS.port_file, {"port": router.port, "http_port": router.http_port})
    wait_for_stop_signal()
    log.info("shutting down (grace %.1fs)", config.shutdown_grace_s)
    router.stop()
    if FLAGS.port_file and os.path.exists(FLAGS.port_file):
        os.remove(FLAGS.port_file)


def run() -> None:
    """The entry point (python -m entrypoints.router, tools/launch_router.py)."""
    app.run(main)


if __name__ == "__main__":
    run()
