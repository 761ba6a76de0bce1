"""Prefill with and without a drafter: what a speculating engine's steps without drafts cost.

  python tools/bench_prefill.py

Two engines over the default model (SmolLM2-135M, float32) sharing one programs store, one
with the n-gram drafter and one with speculation off, each run `Engine.generate` on the same
8 and 32 prompts (200 characters of Python source each, prefix cache off) with max_tokens=1,
greedy and at temperature 0.7, alternating, --rounds times; the first round is dropped and
medians are printed with their ratio. Every step bucket is compiled before the first round.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_list("prompts", ["8", "32"], "Prompts per generate call.")
flags.DEFINE_integer("rounds", 5, "Rounds (the first is dropped).", lower_bound=2)


def main(argv):
    del argv
    import bench_spec
    from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig
    from jinfer.engine import Engine
    from jinfer.programs import ProgramStore
    from jinfer.sampling_params import SamplingParams
    from scheduler.speculation.drafters import NgramDrafter

    model, tok, desc = bench_spec._model("smollm2")
    programs = ProgramStore()
    options = EngineOptions(async_scheduling=True, warmup=True, min_token_bucket=1)

    def engine(drafter):
        return Engine(model, tok, CacheConfig(page_size=16, num_pages=1024, enable_prefix_cache=False),
                      SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=32, max_model_len=1024),
                      options=options, drafter=drafter, max_spec_tokens=8 if drafter else 0, programs=programs)

    engines = {"off": engine(None), "ngram": engine(NgramDrafter())}
    snippets = bench_spec._snippets(64, 0)
    print(f"{desc}; medians of {FLAGS.rounds - 1} rounds")
    for temperature in (0.0, 0.7):
        for n in map(int, FLAGS.prompts):
            prompts = [s[:200] for s in snippets[:n]]
            params = SamplingParams(temperature=temperature, max_tokens=1, seed=1)
            times = {k: [] for k in engines}
            for _ in range(FLAGS.rounds):
                for k, e in engines.items():
                    t0 = time.perf_counter()
                    e.generate(prompts, params)
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v[1:]) for k, v in times.items()}
            print(f"temperature {temperature}, {n} prompts: off {med['off'] * 1e3:.0f} ms, "
                  f"ngram {med['ngram'] * 1e3:.0f} ms, ratio {med['ngram'] / med['off']:.2f}", flush=True)


if __name__ == "__main__":
    app.run(main)
