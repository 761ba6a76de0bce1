"""Synthetic workloads with the statistics of Preble's five traces (its Table 1).

Each spec gives prompt and output length mean/sd, the share of a prompt that is a shared
"key portion" (tool docs, an environment description, a problem statement, a video, a
document), and how many requests share one key portion on average. Requests of a group share
its key portion exactly and add their own tokens; lengths are log-normal with the spec's mean
and sd (positive, and right-skewed like the traces: programming outputs have sd 343 around a
mean of 190). `scale` divides every length (the same structure at CPU size).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from scheduler.simulation.workloads import WorkItem, poisson_arrivals, zipf_weights


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    name: str
    prompt_mean: float
    prompt_sd: float
    output_mean: float
    output_sd: float
    shared_fraction: float
    requests_per_key: float


SPECS = {
    "toolbench": WorkloadSpec("toolbench", 1835, 742, 43, 16, 0.85, 39),
    "embodied": WorkloadSpec("embodied", 2285, 471, 16, 13, 0.97, 48),
    "programming": WorkloadSpec("programming", 3871, 1656, 190, 343, 0.97, 126),
    "videoqa": WorkloadSpec("videoqa", 9865, 5976, 4, 1.5, 0.88, 8.6),
    "loogle": WorkloadSpec("loogle", 23474, 6105, 16, 9.9, 0.91, 18),
}


def base_rate(spec: WorkloadSpec, cost, replicas: int, scale: float = 1.0, batch: int = 64) -> float:
    """Requests/s that `replicas` replicas would serve if every key portion were cached and
    decodes ran `batch` at a time (CostModel `cost`): the unit the benchmarks' rates are given in."""
    own = spec.prompt_mean * (1 - spec.shared_fraction) / scale
    ctx = spec.prompt_mean / scale
    out = max(1.0, spec.output_mean / scale)
    per_request = cost.prefill_time(round(own), round(ctx - own)) + out * cost.step_time([(1, round(ctx))] * batch) / batch
    return replicas / per_request


def _lognormal(rng, mean: float, sd: float, size) -> np.ndarray:
    sigma2 = np.log(1 + (sd / mean) ** 2)
    return rng.lognormal(np.log(mean) - sigma2 / 2, np.sqrt(sigma2), size)


def generate(name: str, num_requests: int, *, rate: float, zipf_a: float = 0.0, scale: float = 1.0,
             max_len: int | None = None, vocab: tuple[int, int] = (100, 32_000), seed: int = 0) -> list[WorkItem]:
    """num_requests of workload `name` with Poisson arrivals at `rate` req/s. Key portions are
    picked evenly (zipf_a = 0) or by Zipf(zipf_a) popularity. max_len caps prompt + output."""
    if name not in SPECS:
        raise ValueError(f"unknown workload {name!r}; known: {sorted(SPECS)}")
    if scale <= 0:
        raise ValueError(f"scale={scale} must be > 0")
    spec = SPECS[name]
    rng = np.random.default_rng(seed)
    num_keys = max(1, round(num_requests / spec.requests_per_key))
    key_len = np.maximum(1, np.round(spec.shared_fraction * _lognormal(rng, spec.prompt_mean, spec.prompt_sd,
                                                                        num_keys) / scale)).astype(int)
    keys = [tuple(int(x) for x in rng.integers(vocab[0], vocab[1], size=n)) for n in key_len]
    groups = rng.choice(num_keys, size=num_requests, p=zipf_weights(num_keys, zipf_a))
    own_mean = (1 - spec.shared_fraction) * spec.prompt_mean / scale
    own = np.maximum(1, np.round(_lognormal(rng, max(own_mean, 1.0), max(own_mean, 1.0) * 0.5,
                                            num_requests))).astype(int)
    outs = np.maximum(1, np.round(_lognormal(rng, spec.output_mean / scale, spec.output_sd / scale,
                                             num_requests))).astype(int)
    items = []
    for g, n_own, out in zip(groups, own, outs):
        prompt = keys[g] + tuple(int(x) for x in rng.integers(vocab[0], vocab[1], size=n_own))
        out = int(out)
        if max_len is not None:
            prompt = prompt[:max(1, max_len - 1)]
            out = max(1, min(out, max_len - len(prompt)))
        items.append(WorkItem(0.0, prompt, out, group=int(g)))
    return poisson_arrivals(items, rate, seed)
