"""The one-command demo (`make demo`): serve the default model (SmolLM2-135M-Instruct), chat
with it, replay a short workload through the benchmark client, print the report, shut the
server down cleanly.

  python tools/demo.py                      # configs/default.py on free ports
  python tools/demo.py --scale=4 --slo=interactive:500:100
  python tools/demo.py --config=configs/test_5m.py --slo=interactive:250:50 --slo=batch:2000:100

Steps: start tools/launch_server.py in a child process (its log and compile progress go to
stderr), wait until it writes its port file, ask the OpenAI-compatible chat endpoint a few
questions (the chat template applied by the server; the last answer streamed token by token as
it arrives), replay `scheduler.simulation.workloads.demo` (interactive requests sharing four prefixes +
longer batch requests, Poisson arrivals), print the report and a few of the server's own
Prometheus metrics, then SIGTERM the server and check it exits 0.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_string("config", os.path.join(ROOT, "configs", "default.py"), "Launch config of the server.")
flags.DEFINE_multi_string("override", [], "Extra server flags, e.g. --override=--config.cache.page_size=32.")
flags.DEFINE_integer("scale", 1, "Multiplies the demo workload's request counts.", lower_bound=1)
flags.DEFINE_float("rate", 0.15, "Multiplies the demo workload's arrival rates (1: 5 interactive + 1.5 batch req/s, "
                   "sized for the 5.1M test model; 0.15: for the default model on 2 CPU cores).",
                   lower_bound=1e-3)
flags.DEFINE_multi_string("chat", ["What is the capital of France?", "Give me three tips for writing clear code."],
                          "Questions asked through /v1/chat/completions before the workload; the last is streamed.")
flags.DEFINE_integer("chat_max_tokens", 96, "Longest answer to each question.", lower_bound=1)
flags.DEFINE_multi_string("slo", ["interactive:1000:150", "batch:8000:400"],
                          "tier:ttft_ms:tpot_ms targets the report judges.")
flags.DEFINE_integer("seed", 0, "Seed of the workload.")
flags.DEFINE_float("start_timeout_s", 900.0, "How long the server may take to load and compile.", lower_bound=1)
flags.DEFINE_string("result_file", "", "Also write the benchmark's JSON result here.")

SHOWN_METRICS = ("jinfer_prefix_cache_hit_rate", "jinfer_kv_page_utilization", "jinfer_generation_tokens_total",
                 "jinfer_requests_finished_total", "jinfer_time_to_first_token_seconds_count")


def _metrics(port: int, shown=SHOWN_METRICS) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return [line for line in text.splitlines() if line.startswith(shown)]


def _wait_for_warmup(port: int) -> None:
    """Waits (up to --start_timeout_s) until the server's background compilation of its step
    buckets ended (jinfer_warmup_in_progress 0), so the replay measures serving, not compiling."""
    deadline, said = time.monotonic() + FLAGS.start_timeout_s, False
    while time.monotonic() < deadline:
        if "jinfer_warmup_in_progress 0.0" in _metrics(port, ("jinfer_warmup_in_progress",)):
            return
        if not said:
            print("waiting for the server to finish compiling its step buckets ...", file=sys.stderr)
            said = True
        time.sleep(0.5)
    print(f"warning: the server still compiles after {FLAGS.start_timeout_s:g}s: replaying anyway", file=sys.stderr)


def _chat(http_target: str, model: str) -> None:
    """Asks each --chat question (greedy); the last answer is streamed as its tokens arrive."""
    import httpx

    url = f"http://{http_target}/v1/chat/completions"
    questions = FLAGS.chat
    with httpx.Client(timeout=300) as http:
        for i, question in enumerate(questions):
            body = {"model": model, "messages": [{"role": "user", "content": question}],
                    "max_tokens": FLAGS.chat_max_tokens, "temperature": 0}
            print(f"\n> {question}")
            if i < len(questions) - 1:
                r = http.post(url, json=body)
                if r.status_code == 400:  # e.g. a model with no chat template (configs/test_5m.py)
                    print(f"(no chat: {r.json()['error']['message']})")
                    return
                r.raise_for_status()
                print(r.json()["choices"][0]["message"]["content"].strip())
                continue
            print("(streamed) ", end="", flush=True)
            with http.stream("POST", url, json={**body, "stream": True}) as r:
                if r.status_code == 400:
                    print(f"(no chat: {json.loads(r.read())['error']['message']})")
                    return
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                    print(delta, end="", flush=True)
            print()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from scheduler.simulation import workloads
    from harness import benchmark as bm

    try:
        slos = bm.parse_slos(FLAGS.slo)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    from entrypoints.process import ServerProcess

    server = ServerProcess([f"--config={FLAGS.config}", "--config.serving.port=0", "--config.serving.metrics_port=0",
                            "--config.serving.http_port=0", *FLAGS.override], stdout=sys.stderr)
    print("starting the server (loads the model and compiles its step buckets) ...", file=sys.stderr)
    server.start()
    try:
        try:
            ports = server.wait_ready(FLAGS.start_timeout_s).ports
        except RuntimeError as e:
            sys.exit(f"error: {e}")
        target = server.target
        from jinfer.serving.client import Client
        with Client(target) as c:
            info = c.server_info(timeout=30)
        if FLAGS.chat:
            print(f"chatting with {info.model} over http://{server.http_target}/v1/chat/completions")
            _chat(server.http_target, info.model)
        _wait_for_warmup(ports["metrics_port"])
        items = workloads.demo((8, info.vocab_size), FLAGS.seed, FLAGS.scale, FLAGS.rate)
        print(f"\nreplaying {len(items)} requests ({info.model}, tiers {list(info.tiers)}) against {target}",
              file=sys.stderr)
        run = bm.replay(target, items)
        summary = bm.summarize(run, slos)
        print(bm.format_report(summary))
        print("\nserver metrics (Prometheus, http://127.0.0.1:%d/metrics):" % ports["metrics_port"])
        for line in _metrics(ports["metrics_port"]):
            print("  " + line)
        if FLAGS.result_file:
            with open(FLAGS.result_file, "w") as f:
                json.dump(bm.result_json(run, summary, {"workload": "demo", "scale": FLAGS.scale,
                                                        "seed": FLAGS.seed, "slo": FLAGS.slo}), f, indent=1)
    finally:
        code = server.stop()
    if code != 0:
        sys.exit(f"error: the server exited with code {code} on shutdown")
    failed = summary["failed"]
    print(f"\nserver shut down cleanly; {summary['completed']} requests completed, {failed} failed")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
