"""Replays a workload (scheduler.simulation.workloads) against a running server and measures it.

Every request is one streamed call sent at its arrival time: a gRPC Generate, or against an
http(s):// target a streamed completion of the OpenAI-compatible API (bench_targets.py).
Latencies are taken on the client: TTFT = first token − send, TPOT = (last token − first
token) / (tokens − 1), latency = last token − send. A request that fails (any gRPC or HTTP
error) counts as completed-with-error and misses every SLO. SLO attainment is the share of a
tier's requests meeting both its TTFT and TPOT targets; goodput is how many of them per second
of the run.

Over HTTP it first times `small_requests` 1-token completions, not streamed, one after another
on one kept-alive connection (the `small_request` row of the report): what a short call costs
beyond the engine's step, where a server that holds a response's body back for the client's
delayed ACK (Nagle) shows as +40 ms.

Over gRPC the server's own count is read too (GetServerStats before and after the run, the
difference): what it finished, met and missed per tier by its own clock and its tiers'
targets. Its TTFT starts at the engine's queue and ends before the network, so it is shorter
than the client's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import ssl
import time

import httpx
import numpy as np

from harness.bench_targets import SERVER_COUNTS, RequestFailed, connect
from jinfer.config import Tier
from jinfer.records import RequestRecord
from scheduler.simulation.workloads import WorkItem

PERCENTILES = (50, 90, 99)


def parse_slos(specs) -> dict[str, Tier]:
    """--slo specs, 'tier:TTFT_MS:TPOT_MS[:weight]' (jinfer.config.Tier.parse: the targets the
    server and the simulator judge by) -> {tier: Tier}; ValueError names a bad one."""
    return {t.name: t for t in (Tier.parse(s) for s in specs)}


def server_tiers(info: dict) -> dict[str, Tier]:
    """The server's judged tiers with their targets (GetServerInfo's tier_info; 0 ms: none), as
    {tier: Tier}: what a report judges a tier by when the client gives it no --slo."""
    seconds = lambda ms: ms / 1e3 if ms else math.inf  # noqa: E731
    return {name: Tier(name, seconds(t["ttft_ms"]), seconds(t["tpot_ms"]))
            for name, t in info.get("tier_targets", {}).items() if t["judged"]}


@dataclasses.dataclass
class Result(RequestRecord):
    """One request as the client saw it (jinfer.records.RequestRecord; times in seconds from the
    start of the run; arrival_s: when it was sent)."""

    session: str = ""
    group: int = -1
    scheduled_s: float = math.nan
    """When the workload scheduled it (it is sent then, or after its session's previous turn)."""
    finish_reason: str = ""


@dataclasses.dataclass
class Run:
    results: list[Result]
    duration_s: float
    server: dict
    server_stats: dict | None = None  # tier -> the server's counts over the run (server_delta); None: not asked
    small_request_s: list[float] = dataclasses.field(default_factory=list)  # each small request's seconds


def server_delta(before: dict | None, after: dict | None, duration_s: float) -> dict | None:
    """What the server counted between two GetServerStats reads (bench_targets stats()), per
    tier: the counts' differences, and SLO-met samples and their tokens per second of
    duration_s. None if either read is missing."""
    if before is None or after is None:
        return None
    out = {}
    for tier, a in after["tiers"].items():
        b = before["tiers"].get(tier, {})
        d = {"judged": a["judged"], **{k: a[k] - b.get(k, 0) for k in SERVER_COUNTS}}
        d["goodput_rps"] = d["slo_met"] / duration_s
        d["goodput_tokens_per_s"] = d["goodput_tokens"] / duration_s
        out[tier] = d
    return out


def server_info(target: str, *, token: str | None = None, root_cert: str | None = None) -> dict:
    """What the server says it serves (model, tiers, max_model_len, vocab_size, ...);
    RequestFailed if it cannot be asked."""
    async def ask():
        client = connect(target, token, root_cert)
        try:
            return await client.info()
        finally:
            await client.close()
    return asyncio.run(ask())


async def _small_requests(target: str, model: str, n: int, *, token, root_cert) -> list[float]:
    """Seconds each of n 1-token completions (not streamed) took, sent one after another on one
    kept-alive connection of the HTTP API (after one more that opens it); RequestFailed if one
    is refused."""
    verify = ssl.create_default_context(cafile=root_cert) if root_cert else True
    body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    times = []
    async with httpx.AsyncClient(base_url=target.rstrip("/"), verify=verify, limits=httpx.Limits(max_connections=1),
                                 headers={"authorization": f"Bearer {token}"} if token else {}, timeout=30) as client:
        for _ in range(n + 1):
            start = time.perf_counter()
            try:
                response = await client.post("/v1/completions", json=body)
            except httpx.HTTPError as e:
                raise RequestFailed(f"{type(e).__name__}: {e}") from None
            times.append(time.perf_counter() - start)
            if response.status_code != 200:
                raise RequestFailed(f"HTTP {response.status_code}: {response.text[:200]}")
    return times[1:]


async def _replay(target: str, items: list[WorkItem], *, token, root_cert, ignore_eos, temperature,
                  max_concurrency, progress, timeout_s, small_requests) -> Run:
    client = connect(target, token, root_cert)
    try:
        info = await client.info()
        small = []
        if small_requests and info.get("protocol") == "http":
            small = await _small_requests(target, info["model"], small_requests, token=token, root_cert=root_cert)
        stats_before = await client.stats()
        first_tier = info["tiers"][0] if info["tiers"] else ""
        results = [Result(i, -1, math.nan, 0, tier=it.tier or first_tier, session=it.session, group=it.group,
                          scheduled_s=it.arrival_s) for i, it in enumerate(items)]
        limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        previous: dict[str, asyncio.Future] = {}  # session -> its last turn (done when it finishes)
        history: dict[str, object] = {}  # session -> conversation so far (ids or text)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(items), desc="requests", unit="req")
        start = time.perf_counter()

        async def one(i: int, item: WorkItem, wait_for: asyncio.Future | None, done: asyncio.Future | None):
            res = results[i]
            try:
                await asyncio.sleep(max(0.0, start + item.arrival_s - time.perf_counter()))
                if wait_for is not None:
                    await asyncio.shield(wait_for)
                prompt = item.prompt
                if item.session and item.session in history:
                    before = history[item.session]
                    if isinstance(before, str) != isinstance(prompt, str):
                        raise ValueError(f"session {item.session!r} mixes text and token-id prompts")
                    prompt = before + prompt
                if limit is not None:
                    await limit.acquire()
                try:
                    res.arrival_s = time.perf_counter() - start
                    out_ids, out_text = [], []
                    async with asyncio.timeout(timeout_s):
                        async for d in client.stream(prompt, item, res.tier, ignore_eos, temperature, i, timeout_s):
                            now = time.perf_counter() - start
                            if d.token_ids and math.isnan(res.first_token_s):
                                res.first_token_s = now
                            out_ids.extend(d.token_ids)
                            out_text.append(d.text)
                            if d.finish_reason:
                                res.finish_s, res.finish_reason = now, d.finish_reason
                            if d.usage:
                                res.prompt_tokens, res.output_tokens, res.cached_tokens = d.usage
                finally:
                    if limit is not None:
                        limit.release()
                if item.session:
                    history[item.session] = prompt + ("".join(out_text) if isinstance(prompt, str)
                                                      else tuple(out_ids))
            except RequestFailed as e:
                res.error = str(e)
            except TimeoutError:
                res.error = f"DEADLINE_EXCEEDED: no answer within {timeout_s} s"
            except ValueError as e:
                res.error = f"CLIENT: {e}"
            finally:
                if done is not None:
                    done.set_result(None)
                if bar is not None:
                    bar.update(1)

        loop = asyncio.get_running_loop()
        tasks = []
        for i, item in enumerate(items):
            wait_for = done = None
            if item.session:
                wait_for = previous.get(item.session)
                done = previous[item.session] = loop.create_future()
            tasks.append(asyncio.create_task(one(i, item, wait_for, done)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if bar is not None:
            bar.close()
        stats = server_delta(stats_before, await client.stats(), duration)
    finally:
        await client.close()
    return Run(results, duration, info, stats, small)


def replay(target: str, items: list[WorkItem], *, token: str | None = None, root_cert: str | None = None,
           ignore_eos: bool = True, temperature: float = 0.0, max_concurrency: int = 0,
           progress: bool = True, timeout_s: float | None = None, small_requests: int = 20) -> Run:
    """Sends every item at its arrival time; returns what each request saw. `target`: host:port
    of a gRPC server (or router), or the http(s):// URL of a server's OpenAI-compatible API.
    max_concurrency > 0 caps requests in flight on the client (0: no cap, the server's
    admission control decides). small_requests: over HTTP, how many 1-token completions to
    time on one kept-alive connection before the run (0: none). RequestFailed if the server
    cannot be asked what it serves or refuses a small request."""
    if not items:
        raise ValueError("the workload is empty")
    if small_requests < 0:
        raise ValueError(f"{small_requests=} must be >= 0")
    return asyncio.run(_replay(target, items, token=token, root_cert=root_cert, ignore_eos=ignore_eos,
                               temperature=temperature, max_concurrency=max_concurrency, progress=progress,
                               timeout_s=timeout_s, small_requests=small_requests))


def _stats(values) -> dict:
    v = np.array([x for x in values if not math.isnan(x)], dtype=float) * 1e3
    if not len(v):
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    return {"mean": float(v.mean()), **{f"p{p}": float(np.percentile(v, p)) for p in PERCENTILES}}


def summarize(run: Run, slos: dict[str, Tier] | None = None) -> dict:
    """Throughput, latency percentiles (ms) overall and per tier, SLO attainment and goodput
    (slos: the tiers judged, with their targets)."""
    slos = slos or {}
    res, dur = run.results, run.duration_s
    ok = [r for r in res if r.ok]
    errors: dict[str, int] = {}
    for r in res:
        if r.error:
            code = r.error.split(":", 1)[0]
            errors[code] = errors.get(code, 0) + 1
    prompt = sum(r.prompt_tokens for r in ok)
    out = sum(r.output_tokens for r in ok)

    def block(rs):
        good = [r for r in rs if r.ok]
        return {"requests": len(rs), "completed": len(good), "failed": len(rs) - len(good),
                "ttft_ms": _stats(r.ttft_s for r in good), "tpot_ms": _stats(r.tpot_s for r in good),
                "latency_ms": _stats(r.latency_s for r in good)}

    summary = {"duration_s": dur, **block(res), "errors": errors,
               "request_throughput": len(ok) / dur, "output_throughput": out / dur,
               "total_throughput": (prompt + out) / dur,
               "prefix_hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
               "tiers": {}}
    served = list(run.server.get("tiers", []))
    order = lambda t: (served.index(t) if t in served else len(served), t)  # noqa: E731 - the server's order
    for tier in sorted({r.tier for r in res} | set(slos), key=order):
        rs = [r for r in res if r.tier == tier]
        t = block(rs)
        if tier in slos:
            slo = slos[tier]
            met = sum(r.meets(slo) for r in rs)
            t["slo"] = {"ttft_ms": slo.ttft_s * 1e3, "tpot_ms": slo.tpot_s * 1e3}
            t["attainment"] = met / len(rs) if rs else None
            t["goodput_rps"] = met / dur
        summary["tiers"][tier] = t
    if run.small_request_s:
        summary["small_request_ms"] = {"requests": len(run.small_request_s), **_stats(run.small_request_s)}
    if run.server_stats is not None:
        summary["server"] = run.server_stats
    return summary


def _fmt(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_report(summary: dict) -> str:
    s = summary
    lines = [
        f"requests: {s['completed']} completed, {s['failed']} failed"
        + (f" ({', '.join(f'{k} x{v}' for k, v in sorted(s['errors'].items()))})" if s["errors"] else "")
        + f" in {s['duration_s']:.2f} s",
        f"throughput: {s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} output tok/s, "
        f"{s['total_throughput']:.1f} total tok/s; prefix-cache hit rate {100 * s['prefix_hit_rate']:.1f} %",
        "",
        "| tier | requests | metric | mean ms | p50 ms | p90 ms | p99 ms |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, block in [("all", s)] + list(s["tiers"].items()):
        for metric in ("ttft_ms", "tpot_ms", "latency_ms"):
            st = block[metric]
            lines.append(f"| {name} | {block['requests']} | {metric[:-3]} | {_fmt(st['mean'])} | {_fmt(st['p50'])} | "
                         f"{_fmt(st['p90'])} | {_fmt(st['p99'])} |")
    if "small_request_ms" in s:  # 1-token completions on one kept-alive connection, before the run
        st = s["small_request_ms"]
        lines.append(f"| one connection | {st['requests']} | small_request | {_fmt(st['mean'])} | {_fmt(st['p50'])} | "
                     f"{_fmt(st['p90'])} | {_fmt(st['p99'])} |")
    judged = {k: v for k, v in s["tiers"].items() if "slo" in v}
    if judged:
        lines += ["", "| tier | SLO ttft ms | SLO tpot ms | attainment | goodput req/s |", "|---|---:|---:|---:|---:|"]
        for name, t in judged.items():
            att = "-" if t["attainment"] is None else f"{100 * t['attainment']:.1f} %"
            lines.append(f"| {name} | {_fmt(t['slo']['ttft_ms'], 0)} | {_fmt(t['slo']['tpot_ms'], 0)} | {att} | "
                         f"{t['goodput_rps']:.2f} |")
    active = {k: v for k, v in s.get("server", {}).items() if v["finished"] or v["aborted"] or v["refused"]}
    if active:
        lines += ["", "server's count over the run (GetServerStats; its own clock and its tiers' targets):",
                  "| tier | finished | SLO met | TTFT missed | TPOT missed | aborted | refused | demoted | "
                  "goodput req/s | goodput tok/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, t in active.items():
            judged = [t["slo_met"], t["ttft_missed"], t["tpot_missed"]] if t["judged"] else ["-"] * 3
            rates = [f"{t['goodput_rps']:.2f}", f"{t['goodput_tokens_per_s']:.1f}"] if t["judged"] else ["-"] * 2
            cells = [t["finished"], *judged, t["aborted"], t["refused"], t["demoted"], *rates]
            lines.append(f"| {name} | " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def result_json(run: Run, summary: dict, settings: dict) -> dict:
    """What --result_file holds: the settings, the server, the summary and every request."""
    reqs = []
    for r in run.results:
        d = dataclasses.asdict(r)
        d.update(ttft_s=r.ttft_s, tpot_s=r.tpot_s, latency_s=r.latency_s)
        reqs.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()})
    return {"settings": settings, "server": run.server, "summary": summary, "requests": reqs}


def save_plot(run: Run, path: str) -> None:
    """CDFs of TTFT, TPOT and latency per tier, and latency over the run (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    tiers = sorted({r.tier for r in run.results})
    for ax, (name, get) in zip(axes, [("TTFT", lambda r: r.ttft_s), ("TPOT", lambda r: r.tpot_s),
                                      ("latency", lambda r: r.latency_s)]):
        for tier in tiers:
            v = np.sort([get(r) * 1e3 for r in run.results if r.ok and r.tier == tier and not math.isnan(get(r))])
            if len(v):
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=tier)
        ax.set(xlabel=f"{name} (ms)", ylabel="fraction of requests", title=f"{name} CDF")
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[3]
    for tier in tiers:
        rs = [r for r in run.results if r.ok and r.tier == tier]
        ax.scatter([r.arrival_s for r in rs], [r.latency_s * 1e3 for r in rs], s=8, label=tier)
    ax.set(xlabel="sent at (s)", ylabel="latency (ms)", title="latency over the run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
