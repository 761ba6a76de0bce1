"""Streams one completion from a jinfer gRPC server to the terminal.

  python tools/client.py --target=127.0.0.1:50051 --prompt="def fibonacci(n):" --max_tokens=64
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("target", "127.0.0.1:50051", "host:port of the server.")
flags.DEFINE_string("prompt", "", "Prompt text.")
flags.DEFINE_integer("max_tokens", 64, "Tokens to generate.", lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 = all.")
flags.DEFINE_integer("seed", None, "Sampling seed; unset: the server draws one.")
flags.DEFINE_string("tier", "", "SLO tier; empty: the server's first tier.")
flags.DEFINE_string("token", "", "Bearer token, when the server requires one.")
flags.DEFINE_string("root_cert", "", "PEM root certificate for a TLS server.")
flags.DEFINE_float("timeout", 300.0, "Seconds before the call is abandoned.")
flags.DEFINE_bool("info", False, "Print the server's GetServerInfo and exit.")
flags.DEFINE_bool("router_stats", False, "Print a router's per-replica view (GetRouterStats) and exit.")
flags.DEFINE_bool("reset_prefix_cache", False, "Drop the server's unused prefix-cache pages (a router: every "
                  "replica's) and exit.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import grpc
    from google.protobuf import json_format

    from jinfer.serving.client import Client

    with Client(FLAGS.target, token=FLAGS.token or None, root_cert=FLAGS.root_cert or None) as client:
        try:
            if FLAGS.info:
                print(json.dumps(json_format.MessageToDict(client.server_info()), indent=2))
                return
            if FLAGS.router_stats:
                print(json.dumps(json_format.MessageToDict(client.router_stats()), indent=2))
                return
            if FLAGS.reset_prefix_cache:
                print(f"freed {client.reset_prefix_cache()} pages")
                return
            if not FLAGS.prompt:
                raise app.UsageError("give --prompt")
            params = dict(max_tokens=FLAGS.max_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                          top_k=FLAGS.top_k, tier=FLAGS.tier)
            if FLAGS.seed is not None:
                params["seed"] = FLAGS.seed
            sys.stdout.write(FLAGS.prompt)
            last = None
            for msg in client.generate_stream(FLAGS.prompt, timeout=FLAGS.timeout, **params):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                last = msg
            u = last.usage
            print(f"\n[{u.completion_tokens} tokens, finish={last.finish_reason}, prompt {u.prompt_tokens} "
                  f"({u.cached_prompt_tokens} cached)]", file=sys.stderr)
        except grpc.RpcError as e:
            sys.exit(f"error: {e.code().name}: {e.details()}")


if __name__ == "__main__":
    app.run(main)
