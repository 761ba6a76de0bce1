"""A run's records (jinfer.records.RequestRecord, one per request) and their judge: latency
percentiles, cache hits and SLO attainment by tier (jinfer.config.Tier.met, the server's own
test of a finished request)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jinfer.config import Tier
from jinfer.records import RequestRecord


@dataclasses.dataclass
class SimResult:
    records: list[RequestRecord]
    sim_time_s: float
    steps: int
    tiers: tuple[Tier, ...] = ()
    """The simulator's SLO tiers, highest first (what tier_stats judges by)."""

    def stats(self) -> dict:
        ok = [r for r in self.records if not r.error]

        def agg(values):
            v = np.array([x for x in values if not math.isnan(x)])
            if not len(v):
                return {"avg": math.nan, "p50": math.nan, "p99": math.nan}
            return {"avg": float(v.mean()), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}

        prompt = sum(r.prompt_tokens for r in ok)
        counts = np.bincount([r.replica for r in ok]) if ok else np.zeros(1)
        return {"requests": len(self.records), "completed": len(ok), "rejected": len(self.records) - len(ok),
                "ttft": agg(r.ttft_s for r in ok), "tpot": agg(r.tpot_s for r in ok),
                "latency": agg(r.latency_s for r in ok),
                "cache_hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
                "per_replica": counts.tolist(), "sim_time_s": self.sim_time_s, "steps": self.steps}

    def tier_stats(self) -> dict:
        """Per SLO tier (in the tiers' order) and over all judged tiers: requests, finished
        (rejected and refused requests are not), met (finished within both targets, Tier.met),
        ttft_misses and tpot_misses (finished requests over each target; one may miss both),
        attainment (met / requests), goodput_rps and goodput_tps (met requests and their output
        tokens per second of `span_s`, from the first arrival to the last finish). A tier
        without targets (or best effort) counts its finished requests as met and stays out of
        "all": goodput is what met a target someone set."""
        finished = [r for r in self.records if not r.error]
        start = min((r.arrival_s for r in self.records), default=0.0)
        span = max((r.finish_s for r in finished), default=start) - start
        per = lambda n: n / span if span > 0 else 0.0  # noqa: E731 - a rate over the span

        def block(tier: Tier | None, rs: list[RequestRecord]) -> dict:
            done = [r for r in rs if not r.error]
            ttft = [r for r in done if tier is not None and tier.judged and r.ttft_s > tier.ttft_s]
            tpot = [r for r in done if tier is not None and tier.judged and r.tpot_s > tier.tpot_s]
            met = [r for r in done if tier is None or not tier.judged or tier.met(r.ttft_s, r.tpot_s)]
            return {"requests": len(rs), "finished": len(done), "met": len(met), "ttft_misses": len(ttft),
                    "tpot_misses": len(tpot), "attainment": len(met) / len(rs) if rs else math.nan,
                    "goodput_rps": per(len(met)), "goodput_tps": per(sum(r.output_tokens for r in met))}

        tiers = {t.name: block(t, [r for r in self.records if r.tier == t.name]) for t in self.tiers}
        judged = [t for t in self.tiers if t.judged]
        total = {k: sum(tiers[t.name][k] for t in judged)
                 for k in ("requests", "finished", "met", "ttft_misses", "tpot_misses", "goodput_rps", "goodput_tps")}
        total["attainment"] = total["met"] / total["requests"] if total["requests"] else math.nan
        return {"span_s": span, "tiers": tiers, "all": total}
