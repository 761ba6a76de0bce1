"""Prometheus metrics of one server, updated on the engine thread, served over HTTP.

Latency histograms carry a `tier` label (the request's SLO tier). Gauges are read from the
engine after every loop iteration; counters only grow, so rates come from PromQL `rate()`;
`jinfer_generation_tokens_per_second` and `jinfer_prefix_cache_hit_rate` are also exported
directly for people reading /metrics by eye. The per-tier goodput counters are read from the
server's Goodput ledger (goodput.py) when scraped, so they are the numbers GetServerStats gives.
"""

from __future__ import annotations

import collections
import math
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jinfer.config import Tier
from jinfer.serving.goodput import Goodput, sample_times

# Seconds. TTFT spans a cached decode on a GPU to a long prefill queued behind others on a CPU.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


# Prometheus name (without _total) -> (TierGoodput field, help). Counters, labelled by tier.
GOODPUT_COUNTERS = {
    "jinfer_tier_requests_finished": ("finished", "Samples that finished (stop or length), judged or not."),
    "jinfer_slo_met": ("slo_met", "Finished samples within both of their tier's TTFT and TPOT targets."),
    "jinfer_ttft_miss": ("ttft_missed", "Finished samples over their tier's TTFT target."),
    "jinfer_tpot_miss": ("tpot_missed", "Finished samples over their tier's TPOT target."),
    "jinfer_goodput_tokens": ("goodput_tokens", "Output tokens of the samples that met their SLO."),
    "jinfer_requests_aborted": ("aborted", "Samples ended early (cancelled, past deadline, failed step)."),
    "jinfer_requests_refused": ("refused", "Samples the scheduling policy's admission check refused."),
    "jinfer_requests_demoted": ("demoted", "Samples the scheduling policy demoted to best effort."),
}


class _GoodputCollector:
    """The goodput ledger as Prometheus counters and gauges, read at scrape time."""

    def __init__(self, goodput: Goodput):
        self.goodput = goodput

    def collect(self):
        stats = self.goodput.snapshot()
        families = []
        for name, (field, doc) in GOODPUT_COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=["tier"])
            for t in stats.tiers:
                family.add_metric([t.tier.name], getattr(t, field))
            families.append(family)
        rps = GaugeMetricFamily("jinfer_goodput_requests_per_second",
                                f"Samples meeting their SLO per second over the last {stats.window_s:g} s.",
                                labels=["tier"])
        tps = GaugeMetricFamily("jinfer_goodput_tokens_per_second",
                                f"Output tokens of samples meeting their SLO per second over the last "
                                f"{stats.window_s:g} s.", labels=["tier"])
        for t in stats.tiers:
            rps.add_metric([t.tier.name], t.recent_goodput_rps)
            tps.add_metric([t.tier.name], t.recent_goodput_tokens_per_s)
        return families + [rps, tps]


class ServerMetrics:
    """One registry per server (several servers can live in one process, as in the tests).

    goodput: the server's ledger, exported as the per-tier goodput counters (none without)."""

    def __init__(self, goodput: Goodput | None = None, window_s: float = 10.0):
        self.registry = CollectorRegistry()
        r = self.registry
        if goodput is not None:
            r.register(_GoodputCollector(goodput))
        self.ttft = Histogram("jinfer_time_to_first_token_seconds", "Arrival to first token, per sample.",
                              ["tier"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("jinfer_time_per_output_token_seconds",
                              "Mean time between a sample's tokens after the first (samples with >= 2 tokens).",
                              ["tier"], buckets=TPOT_BUCKETS, registry=r)
        self.latency = Histogram("jinfer_request_latency_seconds", "Arrival to the last token, per sample.",
                                 ["tier"], buckets=LATENCY_BUCKETS, registry=r)
        self.waiting = Gauge("jinfer_requests_waiting", "Sequences queued, not yet running (queue depth).",
                             registry=r)
        self.running = Gauge("jinfer_requests_running", "Sequences holding KV pages and being stepped.",
                             registry=r)
        self.kv_utilization = Gauge("jinfer_kv_page_utilization",
                                    "Share of KV pages not free (running sequences and cached prefixes).",
                                    registry=r)
        self.prefix_hit_rate = Gauge("jinfer_prefix_cache_hit_rate",
                                     "Cached prompt tokens / prompt tokens of finished requests, since start.",
                                     registry=r)
        self.tokens_per_s = Gauge("jinfer_generation_tokens_per_second",
                                  f"Output tokens per second over the last {window_s:g} s.", registry=r)
        self.prompt_tokens = Counter("jinfer_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.cached_prompt_tokens = Counter("jinfer_cached_prompt_tokens",
                                            "Prompt tokens of finished requests served from the prefix cache.",
                                            registry=r)
        self.generation_tokens = Counter("jinfer_generation_tokens", "Output tokens produced.", registry=r)
        self.finished = Counter("jinfer_requests_finished", "Finished samples by finish reason.",
                                ["finish_reason"], registry=r)
        self.spec_draft_tokens = Counter("jinfer_spec_draft_tokens", "Speculation: draft tokens verified.",
                                         registry=r)
        self.spec_accepted_tokens = Counter("jinfer_spec_accepted_tokens",
                                            "Speculation: draft tokens accepted.", registry=r)
        self.spec_steps = Counter("jinfer_spec_verifications", "Speculation: (request, step) pairs that "
                                  "verified a draft.", registry=r)
        self.spec_drafter_seconds = Counter("jinfer_spec_drafter_seconds",
                                            "Speculation: host time spent in the drafter.", registry=r)
        self.spec_acceptance = Gauge("jinfer_spec_acceptance_rate",
                                     "Accepted / drafted tokens since start.", registry=r)
        self.spec_mean_accepted = Gauge("jinfer_spec_mean_accepted_tokens",
                                        "Accepted draft tokens per verification since start.", registry=r)
        self.warmup_in_progress = Gauge("jinfer_warmup_in_progress", "1 while a background warm-up still compiles "
                                        "step buckets (steps of an uncompiled shape compile first), else 0.",
                                        registry=r)
        self.engine_restarts = Counter("jinfer_engine_restarts", "Engine-loop restarts after a crash, by the "
                                       "class of the exception that crashed it.", ["reason"], registry=r)
        self._spec_seen = None  # the engine's last SpecStats, for counter increments
        self._window_s = window_s
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._prompt_total = self._cached_total = 0
        self._tiers: dict[str, str] = {}  # request id -> tier, while it runs
        self._http = None

    # -- called on the engine thread -------------------------------------------------------

    def on_admit(self, request_id: str, tier: Tier | None, n: int) -> None:
        self._tiers[request_id] = tier.name if tier is not None else ""

    def on_outputs(self, outputs, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        produced = 0
        for out in outputs:
            n_new = len(out.new_token_ids)
            produced += n_new
            tier = self._tiers.get(out.request_id, "")
            if n_new and len(out.token_ids) == n_new and out.first_token_time is not None:
                self.ttft.labels(tier).observe(out.first_token_time - out.arrival_time)
            if not out.finished:
                continue
            self.finished.labels(out.finish_reason or "unknown").inc()
            if out.finish_time is not None:
                self.latency.labels(tier).observe(out.finish_time - out.arrival_time)
                _, tpot = sample_times(out)
                if not math.isnan(tpot):
                    self.tpot.labels(tier).observe(tpot)
            if out.index == 0:  # the prompt is counted once, with its first sample
                self.prompt_tokens.inc(out.usage.prompt_tokens)
                self.cached_prompt_tokens.inc(out.usage.cached_prompt_tokens)
                self._prompt_total += out.usage.prompt_tokens
                self._cached_total += out.usage.cached_prompt_tokens
        if produced:
            self.generation_tokens.inc(produced)
            self._recent.append((now, produced))

    def on_done(self, request_id: str) -> None:
        self._tiers.pop(request_id, None)

    def on_restart(self, reason: str) -> None:
        self.engine_restarts.labels(reason).inc()

    def watch_warmup(self, engine) -> None:
        """jinfer_warmup_in_progress reads engine.warming_up() at each scrape (idle or not)."""
        warming_up = getattr(engine, "warming_up", None)  # (an engine without warm-up: always 0)
        if warming_up is not None:
            self.warmup_in_progress.set_function(lambda: 1.0 if warming_up() else 0.0)

    def update_engine(self, engine, now: float | None = None) -> None:
        """Gauges from the engine's state, and the derived rates (after on_outputs)."""
        load = engine.load()
        self.waiting.set(load.waiting)
        self.running.set(load.running)
        self.kv_utilization.set(1.0 - load.free_pages / load.num_pages)
        spec = engine.spec_stats()
        last = self._spec_seen
        if last is not None:
            self.spec_draft_tokens.inc(spec.draft_tokens - last.draft_tokens)
            self.spec_accepted_tokens.inc(spec.accepted_tokens - last.accepted_tokens)
            self.spec_steps.inc(spec.spec_steps - last.spec_steps)
            self.spec_drafter_seconds.inc(spec.drafter_seconds - last.drafter_seconds)
        else:
            self.spec_draft_tokens.inc(spec.draft_tokens)
            self.spec_accepted_tokens.inc(spec.accepted_tokens)
            self.spec_steps.inc(spec.spec_steps)
            self.spec_drafter_seconds.inc(spec.drafter_seconds)
        self._spec_seen = spec
        self.spec_acceptance.set(spec.acceptance_rate)
        self.spec_mean_accepted.set(spec.mean_accepted)
        self._refresh_rates(time.monotonic() if now is None else now)

    def _refresh_rates(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self._window_s:
            self._recent.popleft()
        self.tokens_per_s.set(sum(n for _, n in self._recent) / self._window_s)
        if self._prompt_total:
            self.prefix_hit_rate.set(self._cached_total / self._prompt_total)

    # -- HTTP ------------------------------------------------------------------------------

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Starts the /metrics HTTP endpoint on a daemon thread; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_address[1]

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
