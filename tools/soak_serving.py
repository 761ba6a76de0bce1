"""Soaks a running jinfer server: many concurrent clients, well-behaved and hostile, for a while.

  python tools/soak_serving.py --target=127.0.0.1:50051 --concurrency=200 --duration_s=60 --pid=1234

See harness/soak.py for what the clients do and what counts as a failure. Exits 1 if any
call ended in a way its action does not allow, or the server did not settle afterwards.
"""

from __future__ import annotations

import asyncio
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_string("target", "127.0.0.1:50051", "host:port of the server.")
flags.DEFINE_string("token", "", "Bearer token, if the server requires one.")
flags.DEFINE_integer("concurrency", 200, "Concurrent client streams.", lower_bound=1)
flags.DEFINE_float("duration_s", 60.0, "How long the clients keep sending (seconds).", lower_bound=0.1)
flags.DEFINE_integer("seed", 0, "Seed of the clients' choices.")
flags.DEFINE_integer("pid", 0, "The server's process id: sample its resident memory (0: don't).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from harness.soak import soak

    metadata = (("authorization", f"Bearer {FLAGS.token}"),) if FLAGS.token else ()
    report = asyncio.run(soak(FLAGS.target, concurrency=FLAGS.concurrency, duration_s=FLAGS.duration_s,
                              seed=FLAGS.seed, server_pid=FLAGS.pid or None, metadata=metadata))
    print(report.table())
    sys.exit(0 if report.settled and not report.unexpected else 1)


if __name__ == "__main__":
    app.run(main)
