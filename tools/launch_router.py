"""Routes requests across jinfer replica servers (tools/launch_server.py) with a routing policy,
until SIGINT/SIGTERM. Clients talk to the router as to one server (jinfer.v1.Inference);
`tools/client.py --router_stats` shows what the policy sees.

  python tools/launch_server.py --config.serving.port=50061 --config.serving.metrics_port=9091 &
  python tools/launch_server.py --config.serving.port=50062 --config.serving.metrics_port=9092 &
  python tools/profile_engine.py --out=cost.json                   # the replicas' step costs
  python tools/launch_router.py --replicas=127.0.0.1:50061,127.0.0.1:50062 \
      --policy=preble-e2 --cost_model=cost.json --port=50051

Policies (scheduler/routing.py): round-robin, least-load, sglang (SGLang's cache-aware router),
preble-e2 (Preble's E2 over a global radix tree; needs --cost_model). Replicas report their load
and prefix-cache evictions to the router over WatchReplica.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the source tree

from scheduler.router_main import run  # noqa: E402 - after the path

if __name__ == "__main__":
    run()
