"""jinfer against llama.cpp on the same weights, both serving /v1/completions on this machine.

  python tools/bench_cpu_peer.py                       # the default model, results as a markdown table
  python tools/bench_cpu_peer.py --rounds=1 --concurrency=8 --tokens=16 --streams=1,2   # a quick look
  python tools/bench_cpu_peer.py --rounds=0 --starts=5 --engines=jinfer   # start-up only, 5 warm starts

Engines (each a server process of its own, started one after another and kept up, so rounds
can interleave): jinfer on configs/default.py in float32 (the GGUF dequantized at load), and
llama.cpp's C++ server (PyPI's xllamacpp, the `peer` extra) on the Q4_1 file its users run and on
the same weights written back as an F32 GGUF (dequantized once, cached beside the original).

Measured per engine:
- start to ready: process start to the first completion served (a 2-token completion of the
  benchmark's ~20-token prompt); jinfer first with an empty compilation cache, then --starts
  times with the cache the first start left (median);
- peak resident memory of the server process (VmHWM) after all rounds;
- output tokens/s with --concurrency streams of --tokens greedy tokens (EOS ignored);
- time per output token with 1, 2, 4, 8 concurrent streams (--streams), from the streamed
  chunks' arrival times (first to last token).
Rounds alternate between engines (engine order rotates each round); the table gives medians.
"""

from __future__ import annotations

import asyncio
import logging
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_string("gguf", "", "The quantized GGUF both engines serve; empty: the default model (fetched once).")
flags.DEFINE_integer("concurrency", 64, "Concurrent streams of the throughput rows.", lower_bound=1)
flags.DEFINE_integer("tokens", 128, "Greedy tokens per request (EOS ignored).", lower_bound=2)
flags.DEFINE_list("streams", ["1", "2", "4", "8"], "Concurrent streams of the per-token latency rows.")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds per measurement; the table gives medians (0: start-up only).",
                     lower_bound=0)
flags.DEFINE_integer("starts", 1, "Warm starts measured per engine (jinfer: after its cold start); the table gives "
                     "their median.", lower_bound=1)
flags.DEFINE_integer("threads", 0, "llama.cpp threads; 0: one per CPU core of this process.", lower_bound=0)
flags.DEFINE_list("engines", ["jinfer", "llama.cpp-q4_1", "llama.cpp-f32"], "Engines to run, in this order.")
flags.DEFINE_multi_string("jinfer_override", [], "Extra jinfer server flags, e.g. --jinfer_override=--config.scheduler.max_num_seqs=128.")
flags.DEFINE_float("start_timeout_s", 900.0, "How long a server may take to become ready.", lower_bound=1)
flags.DEFINE_string("out", "", "Also write the results as JSON here.")
flags.DEFINE_string("child", "", "Internal: run a llama.cpp server (the value is its GGUF file).")
flags.DEFINE_integer("child_port", 0, "Internal: the llama.cpp child's port.")
flags.DEFINE_integer("child_slots", 64, "Internal: the llama.cpp child's parallel slots.")

PROMPT = "Request {i}. Write a short story about a robot who learns to paint, in plain English:"


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_llamacpp_child(path: str, port: int, slots: int, threads: int) -> None:
    """The llama.cpp server, in this process until it is killed."""
    import xllamacpp

    p = xllamacpp.CommonParams()
    p.model.path = path
    p.n_parallel = slots
    p.n_ctx = slots * 512  # llama.cpp gives each slot n_ctx / n_parallel positions
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = threads
    p.port = port
    p.hostnames = ["127.0.0.1"]
    server = xllamacpp.Server(p)  # noqa: F841 - serves until the process ends
    while True:
        time.sleep(3600)


def write_f32_copy(src: str) -> str:
    """The GGUF's weights dequantized and written back as F32 (cached beside src)."""
    import gguf
    import numpy as np

    dst = src.removesuffix(".gguf") + ".F32.gguf"
    if os.path.exists(dst):
        return dst
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst + ".part", r.fields["general.architecture"].contents())
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = 0 if name == "general.file_type" else field.contents()  # 0: all F32
        vtype = field.types[0]
        w.add_key_value(name, value, vtype, sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(dst + ".part", dst)
    return dst


class Engine:
    """One server process speaking /v1/completions."""

    def __init__(self, name: str, cmd: list[str]):
        self.name, self.cmd = name, cmd
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.ready_s = float("nan")
        self.model = ""  # the id /v1/models gives (jinfer checks it; llama.cpp ignores it)

    def start(self, extra: list[str] = ()) -> "Engine":
        self.log = os.path.join(tempfile.gettempdir(), f"bench_cpu_peer.{self.name}.log")
        log = open(self.log, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([a.format(port=self.port) for a in self.cmd + list(extra)], stdout=log,
                                     stderr=subprocess.STDOUT)
        deadline = t0 + FLAGS.start_timeout_s
        while True:  # ready = the first completion served
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}; see {log.name}")
            try:
                self.model = _model_id(self.port)
                asyncio.run(_one(self.port, self.model, 0, 2, stream=False))
                break
            except Exception:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{self.name} not ready after {FLAGS.start_timeout_s} s; see {log.name}")
                time.sleep(0.05)
        self.ready_s = time.perf_counter() - t0
        return self

    def wait_warm(self) -> None:
        """Until a jinfer server's background bucket compilation is done (it would share the
        CPU with every engine's rounds)."""
        if self.name != "jinfer" or any("warmup_background=false" in a.lower() for a in self.cmd):
            return
        deadline = time.perf_counter() + FLAGS.start_timeout_s
        while "step buckets in the background" not in open(self.log).read():
            if self.proc.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"{self.name}: background compilation did not finish; see {self.log}")
            time.sleep(0.5)

    def stop(self) -> float:
        peak = _peak_rss_mib(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return peak


def _model_id(port: int) -> str:
    import httpx
    r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def _one(port: int, model: str, i: int, tokens: int, *, stream: bool, client=None) -> dict:
    """One greedy completion; with stream, the arrival time of every chunk that carries text."""
    import httpx

    body = {"model": model, "prompt": PROMPT.format(i=i), "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    own = client is None
    client = client or httpx.AsyncClient(timeout=600)
    try:
        url = f"http://127.0.0.1:{port}/v1/completions"
        t0 = time.perf_counter()
        if not stream:
            r = await client.post(url, json=body)
            r.raise_for_status()
            return {"tokens": r.json()["usage"]["completion_tokens"], "t0": t0, "end": time.perf_counter()}
        times = []
        async with client.stream("POST", url, json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        times.append(time.perf_counter())
        return {"chunks": times, "t0": t0, "end": time.perf_counter()}
    finally:
        if own:
            await client.aclose()


async def _batch(engine: "Engine", n: int, tokens: int, stream: bool, offset: int) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        return await asyncio.gather(*[_one(engine.port, engine.model, offset + k, tokens, stream=stream, client=client)
                                      for k in range(n)])


def throughput(engine: Engine, offset: int) -> float:
    t0 = time.perf_counter()
    results = asyncio.run(_batch(engine, FLAGS.concurrency, FLAGS.tokens, False, offset))
    wall = time.perf_counter() - t0
    got = sum(r["tokens"] for r in results)
    if got != FLAGS.concurrency * FLAGS.tokens:
        raise RuntimeError(f"{engine.name} returned {got} tokens, expected {FLAGS.concurrency * FLAGS.tokens}")
    return got / wall


def per_token_ms(engine: Engine, streams: int, offset: int) -> float:
    """Median over streams of (last chunk - first chunk) / (chunks - 1), in ms."""
    results = asyncio.run(_batch(engine, streams, FLAGS.tokens, True, offset))
    per = [(r["chunks"][-1] - r["chunks"][0]) / (len(r["chunks"]) - 1) for r in results if len(r["chunks"]) > 1]
    return 1000 * statistics.median(per)


def _engines(path: str) -> list[Engine]:
    threads = FLAGS.threads or len(os.sched_getaffinity(0))
    out = []
    for name in FLAGS.engines:
        if name == "jinfer":
            cmd = [sys.executable, os.path.join(ROOT, "tools", "launch_server.py"),
                   f"--config={os.path.join(ROOT, 'configs', 'default.py')}", f"--config.model.path={path}",
                   "--config.serving.port=0", "--config.serving.metrics_port=0", "--config.serving.http_port={port}",
                   f"--config.scheduler.max_num_seqs={max(FLAGS.concurrency, 8)}", *FLAGS.jinfer_override]
        elif name in ("llama.cpp-q4_1", "llama.cpp-f32"):
            gguf_path = path if name.endswith("q4_1") else write_f32_copy(path)
            cmd = [sys.executable, os.path.abspath(__file__), f"--child={gguf_path}", "--child_port={port}",
                   f"--child_slots={max(FLAGS.concurrency, 8)}", f"--threads={threads}"]
        else:
            raise app.UsageError(f"unknown engine {name!r}; known: jinfer, llama.cpp-q4_1, llama.cpp-f32")
        out.append(Engine(name, cmd))
    return out


def main(argv):
    if FLAGS.child:
        run_llamacpp_child(FLAGS.child, FLAGS.child_port, FLAGS.child_slots,
                           FLAGS.threads or len(os.sched_getaffinity(0)))
        return
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    streams = [int(s) for s in FLAGS.streams]
    from jinfer.model_store import resolve_model_path
    path = os.path.abspath(FLAGS.gguf or resolve_model_path(""))
    engines = _engines(path)
    cold_cache = tempfile.mkdtemp(prefix="jinfer-xla-")
    results = {e.name: {"tok_s": [], **{f"ms@{s}": [] for s in streams}} for e in engines}
    for e in engines:
        jinfer = e.name == "jinfer"  # its first start has an empty compilation cache: the cold one
        extra = [f"--config.engine.compilation_cache={cold_cache}"] if jinfer else []
        starts = []
        for _ in range(FLAGS.starts - 1 + jinfer):  # stopped; the last start stays up for the rounds
            probe = Engine(e.name, e.cmd).start(extra)
            probe.stop()
            starts.append(probe.ready_s)
        e.start(extra)
        starts.append(e.ready_s)
        print(f"{e.name}: ready in {', '.join(f'{s:.2f}' for s in starts)} s", file=sys.stderr)
        if jinfer:
            results[e.name]["ready_cold_s"] = starts.pop(0)
        results[e.name]["ready_starts_s"] = starts
        results[e.name]["ready_s"] = statistics.median(starts)
        if FLAGS.rounds:
            e.wait_warm()
    try:
        for rnd in range(FLAGS.rounds):
            order = engines[rnd % len(engines):] + engines[:rnd % len(engines)]
            for e in order:
                offset = 1000 * (rnd + 1)
                results[e.name]["tok_s"].append(throughput(e, offset))
                for s in streams:
                    results[e.name][f"ms@{s}"].append(per_token_ms(e, s, offset + 500))
                print(f"round {rnd + 1}: {e.name} {results[e.name]['tok_s'][-1]:.0f} tok/s", file=sys.stderr)
    finally:
        for e in engines:
            if e.proc is not None:
                results[e.name]["peak_rss_mib"] = e.stop()
    print(format_table(results, streams))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=1)


def format_table(results: dict, streams: list[int]) -> str:
    med = statistics.median
    head = (["engine", f"tok/s @{FLAGS.concurrency}"] + [f"ms/token @{s}" for s in streams]
            + ["start to ready s (cold / warm)", "peak RSS MiB"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = results.get("jinfer")
    for name, r in results.items():
        ready = f"{r['ready_cold_s']:.1f} / {r['ready_s']:.2f}" if "ready_cold_s" in r else f"{r['ready_s']:.2f}"
        row = [name, f"{med(r['tok_s']):.0f}" if r["tok_s"] else "-"] + [
            f"{med(r[f'ms@{s}']):.1f}" if r[f"ms@{s}"] else "-" for s in streams]
        lines.append("| " + " | ".join(row + [ready, f"{r.get('peak_rss_mib', float('nan')):.0f}"]) + " |")
    if base and base["tok_s"]:
        lines.append("")
        for name, r in results.items():
            if name != "jinfer":
                ratios = [med(base["tok_s"]) / med(r["tok_s"])] + [
                    med(r[f"ms@{s}"]) / med(base[f"ms@{s}"]) for s in streams]
                lines.append(f"jinfer vs {name}: throughput x{ratios[0]:.2f}; per-token speed x"
                             + ", x".join(f"{x:.2f} @{s}" for x, s in zip(ratios[1:], streams))
                             + " (>1: jinfer faster)")
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
