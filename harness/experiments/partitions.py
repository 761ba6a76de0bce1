"""A host's devices split into engine instances, serving one workload, and regrouped under load.

`serve(instances, items)` replays a workload (scheduler.simulation.workloads.WorkItem, token-id prompts) in
wall-clock time: each request, when it arrives, goes to the instance with the fewest unfinished
requests (ties: the first), and every instance with work steps in turn. The engines' async
scheduling dispatches one instance's next step before reading its last, so the instances'
device work overlaps as far as the host allows. Optionally the instances are regrouped
(jinfer.instances.Instances.regroup) once given shares of the output tokens have been produced;
each regroup is timed and its bytes kept.

`partition_study` serves the same workload on several partitions; `regroup_study` serves it
while regrouping and checks every request's tokens against a run without regrouping. Shared by
notebooks/instances_and_resharding.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from typing import Callable, Sequence

import numpy as np

from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig
from jinfer.instances import Instances, RegroupReport
from jinfer.records import RequestRecord
from jinfer.sampling_params import SamplingParams
from scheduler.simulation.workloads import WorkItem, poisson_arrivals, random_lengths
from sharding.reshard import MoveStats


@dataclasses.dataclass
class Regroup:
    """One regroup under load."""

    before: list[int]  # instance sizes
    after: list[int]
    at_s: float  # when it started, from the start of the run
    seconds: float  # wall time of Instances.regroup
    resume_s: float  # from its end to the next token any instance produced
    report: RegroupReport
    unfinished: int  # requests in flight when it started

    def total(self, part: str) -> MoveStats:
        """Summed MoveStats of "weights", "kv" (kept instances' pools) or "migrated" (requests'
        K/V handed from dropped instances)."""
        out = MoveStats()
        if part == "migrated":
            for _, _, stats in self.report.migrated.values():
                out += stats or MoveStats()
        else:
            for stats in getattr(self.report, part).values():
                out += stats
        return out

    @property
    def moved(self) -> MoveStats:
        """Everything the regroup moved, weights and K/V."""
        out = MoveStats()
        for part in ("weights", "kv", "migrated"):
            out += self.total(part)
        return out


@dataclasses.dataclass
class ServeResult:
    sizes: list[int]  # the partition it started on
    requests: list[RequestRecord]  # request k is engine request id f"r{k}"; replica: where it was routed
    regroups: list[Regroup]
    timeline: list[tuple[float, int]]  # (seconds from the start, output tokens so far), per step with output

    @property
    def span_s(self) -> float:
        """First arrival to last finish."""
        return max(r.finish_s for r in self.requests) - min(r.arrival_s for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.requests)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.span_s

    def latency(self, what: str = "latency_s") -> dict[str, float]:
        """mean, p50 and p99 of a RequestRecord property ("latency_s" or "ttft_s"), seconds."""
        v = np.array([getattr(r, what) for r in self.requests])
        return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}

    def tokens(self) -> dict[str, tuple[int, ...]]:
        return {f"r{r.index}": r.output_ids for r in self.requests}

    def per_instance(self) -> list[int]:
        """Requests routed to each instance of the starting partition."""
        return [sum(r.replica == i for r in self.requests) for i in range(len(self.sizes))]


def fewest_unfinished(instances: Instances) -> int:
    """The instance with the fewest waiting + running requests (ties: the first)."""
    loads = [e.load() for e in instances.engines]
    return min(range(len(loads)), key=lambda i: (loads[i].waiting + loads[i].running, i))


def serve(instances: Instances, items: Sequence[WorkItem], *, regroups: Sequence[tuple[float, Sequence[int]]] = (),
          route: Callable[[Instances], int] = fewest_unfinished) -> ServeResult:
    """Replays `items` (token-id prompts, greedy, EOS ignored) on `instances` in wall-clock time.
    regroups: (share of the workload's output tokens produced, new sizes) pairs in order, e.g.
    [(0.5, [4, 4])] regroups once half the tokens are out."""
    sizes = instances.sizes
    total = sum(it.max_tokens for it in items)
    pending = sorted(((it.arrival_s, f"r{k}", it) for k, it in enumerate(items)), key=lambda x: x[0])
    served = {f"r{k}": RequestRecord(k, -1, it.arrival_s, len(it.prompt)) for k, it in enumerate(items)}
    todo = list(regroups)
    events: list[Regroup] = []
    timeline: list[tuple[float, int]] = []
    produced, at, waiting_resume = 0, 0, None
    start = time.perf_counter()
    while at < len(pending) or any(e.has_unfinished() for e in instances.engines):
        now = time.perf_counter() - start
        while at < len(pending) and pending[at][0] <= now:
            _, rid, it = pending[at]
            params = SamplingParams(temperature=0, max_tokens=it.max_tokens, ignore_eos=True)
            served[rid].replica = route(instances)
            instances.engines[served[rid].replica].add_request(list(it.prompt), params, request_id=rid)
            at += 1
        if todo and produced >= todo[0][0] * total:
            _, new = todo.pop(0)
            unfinished = sum(math.isnan(r.finish_s) for r in served.values()) - (len(pending) - at)
            t0 = time.perf_counter()
            before = instances.sizes
            report = instances.regroup(list(new))
            t1 = time.perf_counter()
            waiting_resume = Regroup(before, instances.sizes, t0 - start, t1 - t0, math.nan, report, unfinished)
            events.append(waiting_resume)
        stepped = False
        for engine in instances.engines:
            if not engine.has_unfinished():
                continue
            stepped = True
            for out in engine.step():
                rec = served[out.request_id]
                t = time.perf_counter() - start
                if out.new_token_ids:
                    produced += len(out.new_token_ids)
                    if math.isnan(rec.first_token_s):
                        rec.first_token_s = t
                    if waiting_resume is not None:
                        waiting_resume.resume_s = t - waiting_resume.at_s - waiting_resume.seconds
                        waiting_resume = None
                if out.finished:
                    rec.finish_s, rec.output_ids, rec.output_tokens = t, tuple(out.token_ids), len(out.token_ids)
            if not timeline or timeline[-1][1] != produced:
                timeline.append((time.perf_counter() - start, produced))
        if not stepped and at < len(pending):
            time.sleep(max(0.0, pending[at][0] - (time.perf_counter() - start)))
    return ServeResult(sizes, list(served.values()), events, timeline)


@dataclasses.dataclass(frozen=True)
class PartitionStudy:
    """notebooks/instances_and_resharding at one size: the embedded test model on `partitions`
    of 8 devices, each serving `num_requests` requests (prompts of ~input_len random token ids,
    output_len tokens each, lengths ±50%) arriving at `rate` req/s; then the workload again on
    regroup_from, regrouped at the given shares of its output tokens."""

    partitions: tuple[tuple[int, ...], ...]
    num_requests: int
    input_len: int
    output_len: int
    rate: float
    regroup_from: tuple[int, ...]
    regroups: tuple[tuple[float, tuple[int, ...]], ...]
    max_num_batched_tokens: int = 16
    max_num_seqs: int = 8
    num_pages: int = 128
    page_size: int = 16
    seed: int = 0

    def engine_kwargs(self, compilation_cache: str) -> dict:
        """Every instance's Engine arguments: its step buckets compiled when it is built
        (EngineOptions.warmup), through a persistent compilation cache so that an instance
        on devices another one used before loads its programs instead of compiling them."""
        return dict(cache_config=CacheConfig(page_size=self.page_size, num_pages=self.num_pages),
                    scheduler_config=SchedulerConfig(max_num_batched_tokens=self.max_num_batched_tokens,
                                                     max_num_seqs=self.max_num_seqs,
                                                     max_model_len=2 * (self.input_len + self.output_len)),
                    options=EngineOptions(warmup=True, compilation_cache=compilation_cache))

    def workload(self, vocab_size: int) -> list[WorkItem]:
        items = random_lengths(self.num_requests, input_len=self.input_len, output_len=self.output_len,
                               vocab=(2, vocab_size), seed=self.seed)
        return poisson_arrivals(items, self.rate, self.seed)


PARTITION_STUDY = {
    # Instances on 3 distinct device groups in all (a compilation each); the regroup reuses them.
    "small": PartitionStudy(partitions=((8,), (4, 4)), num_requests=16, input_len=24, output_len=12,
                            rate=math.inf, regroup_from=(4, 4), regroups=((0.4, (8,)),)),
    "full": PartitionStudy(partitions=((8,), (4, 4), (2, 2, 2, 2), (1,) * 8, (4, 2, 1, 1)), num_requests=96,
                           input_len=48, output_len=48, rate=math.inf, regroup_from=(4, 2, 1, 1),
                           regroups=((0.3, (4, 4)), (0.6, (2, 2, 2, 2))), max_num_batched_tokens=32,
                           max_num_seqs=16),
}


@dataclasses.dataclass
class StudyResult:
    runs: list[ServeResult]  # one per partition
    build_s: list[float]  # seconds to build each partition's instances (compilation included)
    regrouped: ServeResult
    reference: ServeResult  # the run whose tokens the regrouped run is checked against

    @property
    def outputs_unchanged(self) -> bool:
        """Every request of the regrouped run produced the reference run's tokens."""
        return self.regrouped.tokens() == self.reference.tokens()


def run_partition_study(model, tokenizer, study: PartitionStudy, compilation_cache: str | None = None,
                        log: Callable[[str], None] = lambda _: None) -> StudyResult:
    """Serves study.workload on each partition, then on regroup_from with the regroups; the
    reference for the regrouped run's tokens is the partition run of regroup_from when it is
    among the partitions, else a run of its own."""
    cache = compilation_cache or tempfile.mkdtemp(prefix="jinfer-xla-")
    kwargs = study.engine_kwargs(cache)
    items = study.workload(tokenizer.vocab_size)
    runs, build = [], []
    for sizes in study.partitions:
        t0 = time.perf_counter()
        inst = Instances(model, tokenizer, list(sizes), **kwargs)
        build.append(time.perf_counter() - t0)
        runs.append(serve(inst, items))
        log(f"{partition_name(sizes)}: built in {build[-1]:.1f} s, {runs[-1].tokens_per_s:.0f} tok/s")
        del inst
    if tuple(study.regroup_from) in study.partitions:
        reference = runs[study.partitions.index(tuple(study.regroup_from))]
    else:
        reference = serve(Instances(model, tokenizer, list(study.regroup_from), **kwargs), items)
    inst = Instances(model, tokenizer, list(study.regroup_from), **kwargs)
    regrouped = serve(inst, items, regroups=study.regroups)
    return StudyResult(runs, build, regrouped, reference)


def partition_name(sizes: Sequence[int]) -> str:
    """[4, 2, 1, 1] -> "4+2+1+1"; eight ones -> "8x1"."""
    sizes = list(sizes)
    if len(sizes) > 4 and len(set(sizes)) == 1:
        return f"{len(sizes)}x{sizes[0]}"
    return "+".join(map(str, sizes))


def findings(result: StudyResult, study: PartitionStudy) -> str:
    """What the measurements say, as markdown bullets computed from them."""
    runs = result.runs
    best = max(runs, key=lambda r: r.tokens_per_s)
    worst = min(runs, key=lambda r: r.tokens_per_s)
    quick = min(runs, key=lambda r: r.latency("ttft_s")["mean"])
    out = [f"- Throughput: {partition_name(best.sizes)} served the most ({best.tokens_per_s:,.0f} output tokens/s), "
           f"{best.tokens_per_s / worst.tokens_per_s:.2f}x {partition_name(worst.sizes)} ({worst.tokens_per_s:,.0f}).",
           f"- Latency: {partition_name(quick.sizes)} gave the lowest mean time to first token "
           f"({quick.latency('ttft_s')['mean']:.2f} s); mean request latency ranged from "
           f"{min(r.latency()['mean'] for r in runs):.2f} to {max(r.latency()['mean'] for r in runs):.2f} s."]
    for ev in result.regrouped.regroups:
        w, moved = ev.total("weights"), ev.moved
        migrated = sum(n for _, n, _ in ev.report.migrated.values())
        out.append(
            f"- Regroup {partition_name(ev.before)} -> {partition_name(ev.after)} with {ev.unfinished} requests in "
            "flight: "
            f"{ev.seconds:.2f} s, then {ev.resume_s:.2f} s to the next token; it moved {moved.moved / 2**20:.1f} MiB "
            f"({'exactly' if moved.moved == moved.minimum else f'{moved.moved / moved.minimum:.2f}x'} the minimum "
            f"{moved.minimum / 2**20:.1f} MiB) where reloading every new shard would place "
            f"{moved.full_reload / 2**20:.1f} MiB; weights {w.moved / 2**20:.1f} of {w.full_reload / 2**20:.1f} MiB"
            + (f"; {migrated} requests migrated with their K/V." if migrated else "."))
    same = result.outputs_unchanged
    out.append(f"- Outputs: {'every' if same else 'NOT every'} request of the regrouped run produced the same "
               f"tokens as the run without regrouping ({len(result.regrouped.requests)} requests, greedy).")
    return "\n".join(out)
