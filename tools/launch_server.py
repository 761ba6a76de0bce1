"""Serves a model over gRPC (jinfer.v1.Inference) with Prometheus metrics, until SIGINT/SIGTERM.

  python tools/launch_server.py                                   # configs/default.py
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

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the source tree

from jinfer.serving.main import run  # noqa: E402 - after the path

if __name__ == "__main__":
    run()
