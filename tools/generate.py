"""Generation from the command line, through the continuous-batching engine.

  python tools/generate.py --prompt="The capital of France is" --json   # the default model (SmolLM2-135M-Instruct)
  python tools/generate.py --config.model.path=/path/to/hf_checkpoint --prompt="def f(x):" --max_tokens=32
  python tools/generate.py --config.scheduler.max_model_len=1024 --config.model.tp=2 --prompt=...

The model, cache, scheduler and engine come from the same launch config as the server
(`--config`, default configs/default.py; any field as --config.<section>.<field>=value) and
are loaded by the same code (entrypoints.build.build_engine); the flags below are this tool's own:
prompts, sampling, output and the multi-process cluster. Buckets compile on first use (no
warm-up) and JAX's persistent compilation cache (`engine.compilation_cache`, on in the
default config) makes a second run of the same command start fast.

Across hosts (one process per host, the same flags everywhere but --process_id; only process
0 prints; --config.model.tp counts the devices of all processes):
  python tools/generate.py --config.model.tp=16 --coordinator_address=host0:1234 --num_processes=2 --process_id=0 ...
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the source tree

import configs  # noqa: E402 - after the path
from entrypoints.process import define_mesh_flags  # noqa: E402
from jinfer.launch import define_config_flag, parse_flags  # noqa: E402

FLAGS = flags.FLAGS
CONFIG = define_config_flag(os.path.join(os.path.dirname(configs.__file__), "default.py"))
flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for a batch.")
flags.DEFINE_string("prompts_file", "", "A file with one prompt per line (added after --prompt).")
flags.DEFINE_integer("max_tokens", 32, "Tokens to generate per prompt.", lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep tokens covering this probability mass.")
flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens; 0 = all.")
flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p × the most likely token's probability.")
flags.DEFINE_integer("n", 1, "Independent samples per prompt (they share the prompt's KV pages).",
                     lower_bound=1)
flags.DEFINE_integer("seed", 0, "Sampling seed.")
define_mesh_flags()
flags.DEFINE_bool("json", False, "Print one JSON object per completion (prompt, index, token_ids, "
                  "text, finish_reason) instead of text for a person.")


def _prompts() -> list[str]:
    prompts = list(FLAGS.prompt)
    if FLAGS.prompts_file:
        with open(FLAGS.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise app.UsageError("give at least one --prompt or a --prompts_file")
    return prompts


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    prompts = _prompts()
    report = sys.stdout
    if FLAGS.num_processes > 1:
        # Collective libraries log connection chatter to stdout from C++; keep stdout for the
        # results (--json stays machine-readable) and send everything else to stderr.
        sys.stdout.flush()
        report = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
    from jinfer.engine import enable_compilation_cache
    from entrypoints.build import build_engine
    from jinfer.launch import resolve
    from jinfer.sampling_params import SamplingParams
    from sharding.distributed import initialize

    t0 = time.perf_counter()
    try:
        initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        launch = resolve(CONFIG.value)
        # One batch of prompts: compile only the buckets it uses.
        launch = dataclasses.replace(launch, engine=dataclasses.replace(launch.engine, warmup=False))
        if launch.engine.compilation_cache:
            enable_compilation_cache(launch.engine.compilation_cache)  # before loading: its programs too
        params = SamplingParams(temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k,
                                min_p=FLAGS.min_p, seed=FLAGS.seed, max_tokens=FLAGS.max_tokens,
                                n=FLAGS.n)
        engine = build_engine(launch)
        t1 = time.perf_counter()
        outputs = engine.generate(prompts, params)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    t2 = time.perf_counter()
    if FLAGS.process_id != 0:
        return  # every process computed the same outputs; process 0 reports them
    for i, out in enumerate(outputs):  # n per prompt, in prompt order
        prompt = prompts[i // FLAGS.n]
        if FLAGS.json:
            print(json.dumps({"prompt": prompt, "index": out.index, "token_ids": out.token_ids,
                              "text": out.text, "finish_reason": out.finish_reason,
                              "draft_tokens": out.usage.draft_tokens,
                              "accepted_draft_tokens": out.usage.accepted_draft_tokens}), file=report)
        else:
            sample = f" (sample {out.index})" if FLAGS.n > 1 else ""
            u = out.usage
            spec = (f", {u.accepted_draft_tokens}/{u.draft_tokens} draft tokens accepted in {u.spec_steps} steps"
                    if u.draft_tokens else "")
            print(f"--- {prompt!r}{sample}\n{prompt}{out.text}\n[{len(out.token_ids)} tokens, "
                  f"finish={out.finish_reason}{spec}]", file=report)
    if not FLAGS.json:
        n = sum(len(o.token_ids) for o in outputs)
        print(f"load {t1 - t0:.2f}s; generate {t2 - t1:.2f}s for {n} tokens (includes compilation)",
              file=report)
    report.flush()


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
