"""The same model's engine step at several tensor-parallel layouts, measured side by side.

For each tp degree, with the embedding and LM head split over the vocabulary or replicated,
the model runner's jitted step (forward + greedy sampling, the engine's own program) runs a
decode step at several batch sizes and a one-sequence prefill step, every layout's steps timed
in turn in each round. Reported per layout: median step times, decode throughput, parameter
and KV-pool bytes on one device, and the bytes its collectives move per step
(harness.experiments.hlo, from the compiled program). Shared by tools/bench_tp.py and
notebooks/sharding_strategies.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Sequence

import jax

from harness.experiments.hlo import CollectiveTraffic, collective_traffic
from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.models.config import scaled_llama
from jinfer.models.llama import init_model
from jinfer.runner import ModelRunner
from jinfer.sampling_params import SamplingParams
from jinfer.step_plan import ScheduledSeq, StepPlan
from sharding.tp import TPLayout, make_mesh

_GREEDY = SamplingParams(temperature=0)


@dataclasses.dataclass(frozen=True)
class StepShapes:
    """The steps measured: decode of `batch` sequences with `context` tokens cached each, and a
    prefill of one `prefill`-token prompt. `batches`: more decode batch sizes for throughput."""

    batch: int = 32
    context: int = 256
    prefill: int = 512
    batches: tuple[int, ...] = ()
    page_size: int = 16

    @property
    def max_batch(self) -> int:
        return max((self.batch, *self.batches))

    def decode_plan(self, batch: int | None = None) -> StepPlan:
        """`batch` (default self.batch) sequences each adding one token after `context` cached."""
        per_seq = -(-(self.context + 1) // self.page_size)
        return StepPlan(tuple(
            ScheduledSeq(f"d{i}", (7,), self.context, tuple(range(i * per_seq, (i + 1) * per_seq)), True, _GREEDY,
                         0, 0, 0)
            for i in range(self.batch if batch is None else batch)))

    def prefill_plan(self) -> StepPlan:
        pages = -(-self.prefill // self.page_size)
        return StepPlan((ScheduledSeq("p", tuple(range(1, self.prefill + 1)), 0, tuple(range(pages)), True,
                                      _GREEDY, 0, 0, 0),))

    def cache_config(self) -> CacheConfig:
        """A pool holding every decode sequence (the same pool at every tp)."""
        ctx = max(self.context + 1, self.prefill)
        return CacheConfig(page_size=self.page_size, num_pages=self.max_batch * (-(-ctx // self.page_size)) + 8)

    def scheduler_config(self) -> SchedulerConfig:
        ctx = max(self.context + 1, self.prefill)
        return SchedulerConfig(max_num_batched_tokens=max(self.prefill, self.max_batch),
                               max_num_seqs=self.max_batch, max_model_len=ctx)


def device_bytes(tree, device) -> int:
    """Bytes of the arrays in `tree` that live on `device` (its shards, replicas included)."""
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


def step_traffic(runner: ModelRunner, plan: StepPlan) -> CollectiveTraffic:
    """The collectives of the compiled step program that runs `plan` (its bucket's program)."""
    _, args = runner.prepare(plan)
    # The runner's jitted step, lowered with the arguments execute() passes it: the program
    # measured is the one that runs (its compilation is cached from the warm-up).
    with runner._mesh():
        compiled = runner._step.lower(runner.state, runner.kv, runner._prev_tokens, *args).compile()
    return collective_traffic(compiled.as_text())


@dataclasses.dataclass(frozen=True)
class LayoutResult:
    """One layout's measurements. Times in ms, bytes on the mesh's first device."""

    tp: int
    vocab_parallel: bool
    decode_ms: dict[int, float]  # decode batch -> median step time
    prefill_ms: float
    param_bytes: int
    kv_bytes: int
    decode_traffic: CollectiveTraffic | None  # of the decode step at StepShapes.batch
    prefill_traffic: CollectiveTraffic | None
    decode_tokens: int  # tokens the decode step at StepShapes.batch is padded to (its bucket)
    prefill_tokens: int

    def decode_tokens_per_s(self, batch: int) -> float:
        return batch / (self.decode_ms[batch] / 1e3)


def measure_layouts(model, shapes: StepShapes, layouts: Sequence[tuple[int, bool]], *, repeats: int = 7,
                    throughput: bool = True, traffic: bool = True, devices=None) -> list[LayoutResult]:
    """Runs `model` at each (tp, vocab_parallel) layout (a mesh of the first tp `devices`) and
    measures, side by side: every layout's steps (decode at shapes.batch, and at shapes.batches
    with `throughput` and a split head; prefill) are compiled and run once, then timed once
    each per round for `repeats` rounds, so that load from elsewhere on a shared machine falls
    on every layout alike; times are medians over the rounds. traffic: also read the
    collectives of each layout's decode (at shapes.batch) and prefill programs."""
    runs = []
    for tp, split in layouts:
        layout = TPLayout.for_model(model.config, make_mesh(tp, devices), vocab_parallel=split)
        runner = ModelRunner(model, shapes.cache_config(), shapes.scheduler_config(), layout)
        batches = (shapes.batch, *(shapes.batches if throughput and split else ()))
        plans = {b: shapes.decode_plan(b) for b in dict.fromkeys(batches)}
        plans["prefill"] = shapes.prefill_plan()
        for plan in plans.values():
            runner.execute(plan)  # compiles the plan's bucket
        runs.append((runner, plans, {k: [] for k in plans}))
    for _ in range(repeats):
        for runner, plans, times in runs:
            for key, plan in plans.items():
                start = time.perf_counter()
                runner.execute(plan)
                times[key].append(time.perf_counter() - start)
    results = []
    for (tp, split), (runner, plans, times) in zip(layouts, runs):
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        first = runner.layout.mesh.devices.flat[0]
        results.append(LayoutResult(
            tp, split, {b: ms[b] for b in plans if b != "prefill"}, ms["prefill"], device_bytes(runner.state, first),
            device_bytes(runner.kv, first), step_traffic(runner, shapes.decode_plan()) if traffic else None,
            step_traffic(runner, shapes.prefill_plan()) if traffic else None,
            runner.bucket(shapes.batch)[0], runner.bucket(shapes.prefill)[0]))
    return results


@dataclasses.dataclass(frozen=True)
class ShardingStudy:
    """notebooks/sharding_strategies at one size: a random-weight Llama (jinfer.models.config.
    scaled_llama) at every tp in `tps` with the vocabulary split, and replicated at `head_tps`."""

    hidden_size: int
    num_layers: int
    vocab_size: int
    shapes: StepShapes
    tps: tuple[int, ...] = (1, 2, 4, 8)
    head_tps: tuple[int, ...] = (2, 4, 8)
    repeats: int = 5

    def model_config(self):
        return scaled_llama(self.hidden_size, self.num_layers, self.vocab_size)


SHARDING_STUDY = {
    # One step bucket (16 tokens) for every measurement: a compilation per layout, seconds each.
    "small": ShardingStudy(512, 1, 4096, StepShapes(batch=16, context=32, prefill=16, batches=(1, 4)),
                           head_tps=(8,), repeats=3),
    # benchmarks/tp.md's model and steps, with decode batches 1 to 64.
    "full": ShardingStudy(512, 4, 32768, StepShapes(batch=32, context=256, prefill=512, batches=(1, 8, 64)),
                          repeats=9),
}


def run_sharding_study(study: ShardingStudy, log: Callable[[str], None] = lambda _: None) -> list[LayoutResult]:
    """Every layout of `study`, measured side by side (measure_layouts): the split head at each
    tp, then the replicated one at head_tps."""
    model = init_model(study.model_config(), seed=0)
    layouts = [(tp, True) for tp in study.tps] + [(tp, False) for tp in study.head_tps]
    results = measure_layouts(model, study.shapes, layouts, repeats=study.repeats)
    for r in results:
        log(f"tp {r.tp}, {'split' if r.vocab_parallel else 'replicated'} head: decode "
            f"{r.decode_ms[study.shapes.batch]:.2f} ms, prefill {r.prefill_ms:.2f} ms")
    return results


def megatron_bytes(cfg, tokens: int, tp: int, vocab_parallel: bool = True, itemsize: int = 4) -> int:
    """The all-reduce bytes per device that the Megatron layout needs in a step of `tokens`
    (padded) tokens: the [tokens, hidden] activations after each layer's attention output and
    MLP down projections, and after the embedding lookup when the vocabulary is split; none at
    tp 1. (Sampling's reductions over a split vocabulary add a few bytes per sequence.)"""
    if tp == 1:
        return 0
    split = vocab_parallel and cfg.vocab_size % tp == 0
    return (2 * cfg.num_layers + split) * tokens * cfg.hidden_size * itemsize


def findings(results: Sequence[LayoutResult], study: ShardingStudy) -> str:
    """What the measurements say, as markdown bullets computed from them."""
    cfg, b = study.model_config(), study.shapes.batch
    split = {r.tp: r for r in results if r.vocab_parallel}
    whole = {r.tp: r for r in results if not r.vocab_parallel}
    base = split[min(split)]
    fastest = min(split.values(), key=lambda r: r.decode_ms[b])
    top = split[max(split)]
    out = [
        f"- Decode ({b} sequences): fastest at tp {fastest.tp} ({fastest.decode_ms[b]:.2f} ms, "
        f"{base.decode_ms[b] / fastest.decode_ms[b]:.2f}x tp {base.tp}); tp {top.tp} takes "
        f"{top.decode_ms[b] / base.decode_ms[b]:.2f}x the tp {base.tp} time. Prefill ({study.shapes.prefill} "
        f"tokens) at tp {top.tp}: {top.prefill_ms / base.prefill_ms:.2f}x tp {base.tp}.",
        f"- Parameters per device fall from {base.param_bytes / 2**20:.1f} MiB (tp {base.tp}) to "
        f"{top.param_bytes / 2**20:.1f} MiB (tp {top.tp}): {base.param_bytes / top.param_bytes:.2f}x less for "
        f"{top.tp // base.tp}x the devices (norms stay whole on every device, and so do the K/V projections where "
        "tp exceeds the KV heads).",
    ]
    kv_split = [t for t in split if t > 1 and cfg.num_kv_heads % t == 0]
    kv_whole = [t for t in split if t > 1 and cfg.num_kv_heads % t]
    kv = f"- The KV pool per device is {base.kv_bytes / 2**20:.1f} MiB at tp {base.tp}"
    if kv_split:
        kv += ", " + ", ".join(f"{split[t].kv_bytes / 2**20:.1f} MiB at tp {t}" for t in kv_split)
    if kv_whole:
        kv += (f"; at tp {', '.join(map(str, kv_whole))} ({cfg.num_kv_heads} KV heads < tp) every device keeps "
               f"the whole pool again ({split[kv_whole[0]].kv_bytes / 2**20:.1f} MiB): the same pages hold no more "
               "tokens, they are only copied")
    out.append(kv + ".")
    if top.decode_traffic is not None:
        meas = top.decode_traffic.by_kind()["all-reduce"][1]
        pred = megatron_bytes(cfg, top.decode_tokens, top.tp)
        out.append(
            f"- Bytes crossing devices per decode step at tp {top.tp}: {top.decode_traffic.bytes() / 1024:.1f} KiB per "
            f"device on the step's straight path, {meas / 1024:.1f} KiB of it all-reduces against "
            f"{pred / 1024:.1f} KiB for Megatron's (2 x {cfg.num_layers} layers + 1 embedding) x "
            f"{top.decode_tokens} tokens x {cfg.hidden_size} x 4 bytes." + _same_at_every_tp(split))
    for t, r in sorted(whole.items()):
        s = split[t]
        out.append(
            f"- Head at tp {t}: replicated takes {r.decode_ms[b] / s.decode_ms[b]:.2f}x the split decode step and "
            f"{r.prefill_ms / s.prefill_ms:.2f}x its prefill, holds {r.param_bytes / s.param_bytes:.2f}x the "
            f"parameter bytes ({r.param_bytes / 2**20:.1f} vs {s.param_bytes / 2**20:.1f} MiB)"
            + (f", and moves {r.decode_traffic.bytes() / 1024:.1f} vs {s.decode_traffic.bytes() / 1024:.1f} KiB per "
               "decode step." if r.decode_traffic is not None else "."))
    return "\n".join(out)


def _same_at_every_tp(split: dict[int, LayoutResult]) -> str:
    sent = {t: r.decode_traffic.by_kind()["all-reduce"][1] for t, r in split.items() if t > 1}
    if len(sent) > 1 and len(set(sent.values())) == 1:
        return (" The all-reduce bytes are the same at every tp > 1: what a device sends grows with the tokens "
                "in the step, not with tp (a ring all-reduce puts 2(tp-1)/tp of them on each link).")
    return " All-reduce bytes by tp: " + ", ".join(f"{t}: {b / 1024:.1f} KiB" for t, b in sent.items()) + "."
