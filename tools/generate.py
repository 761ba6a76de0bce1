"""Generation from the command line, through the continuous-batching engine.

  python tools/generate.py --model_path=/path/to/hf_checkpoint --prompt="def f(x):" --max_tokens=32
  python tools/generate.py --prompt="def f(x):" --json  # no --model_path: the embedded default model

Across hosts (one process per host, the same flags everywhere but --process_id; only process
0 prints; --tp counts the devices of all processes):
  python tools/generate.py --tp=16 --coordinator_address=host0:1234 --num_processes=2 --process_id=0 ...

Without --model_path it loads the embedded default model (jinfer/default_model: a small Llama
trained on the Python standard library, HF format) through the same loader.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model_path", "", "HF checkpoint directory (config.json, safetensors, "
                    "tokenizer.json). Empty: the embedded default model "
                    "(jinfer/default_model).")
flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for a batch.")
flags.DEFINE_string("prompts_file", "", "A file with one prompt per line (added after --prompt).")
flags.DEFINE_integer("max_tokens", 32, "Tokens to generate per prompt.", lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep tokens covering this probability mass.")
flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens; 0 = all.")
flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p × the most likely token's probability.")
flags.DEFINE_integer("max_num_batched_tokens", 256, "Token budget of one engine step.")
flags.DEFINE_integer("max_num_seqs", 32, "Sequences in one engine step.")
flags.DEFINE_integer("max_model_len", 1024, "Longest prompt + output, in tokens.")
flags.DEFINE_integer("num_pages", 0, "KV pages in the pool; 0 sizes it from device memory.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and activation dtype.")
flags.DEFINE_enum("attention_backend", "", ["", "xla", "pallas"],
                  "Attention implementation; empty: pallas on NVIDIA GPUs, xla elsewhere.")
flags.DEFINE_integer("tp", 1, "Tensor-parallel degree: a mesh over the first tp devices.",
                     lower_bound=1)
flags.DEFINE_integer("page_size", 16, "Tokens per KV-cache page.", lower_bound=1)
flags.DEFINE_integer("n", 1, "Independent samples per prompt (they share the prompt's KV pages).",
                     lower_bound=1)
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("coordinator_address", "127.0.0.1:12355",
                    "host:port of process 0, which coordinates a multi-process mesh.")
flags.DEFINE_integer("num_processes", 1, "Processes (hosts) in the mesh; 1 = this process alone.",
                     lower_bound=1)
flags.DEFINE_integer("process_id", 0, "This process's rank in [0, num_processes).", lower_bound=0)
flags.DEFINE_string("compilation_cache", "~/.cache/jinfer/xla",
                    "JAX persistent compilation cache directory, so a second run of the same command "
                    "skips compiling; empty: off.")
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


def _load(mesh):
    import jax.numpy as jnp

    from jinfer import DEFAULT_MODEL_DIR
    from jinfer.loader.hf import load_hf_model
    from jinfer.tokenizer import Tokenizer

    dtype = jnp.dtype(FLAGS.dtype)
    path = FLAGS.model_path or DEFAULT_MODEL_DIR
    if mesh is not None:
        from jinfer.loader.hf import load_sharded
        model = load_sharded(path, mesh, dtype=dtype)  # straight into shards
    else:
        model = load_hf_model(path, dtype=dtype)
    cfg = model.config
    tok = Tokenizer.from_dir(path, bos_id=cfg.bos_token_id, eos_ids=cfg.eos_token_ids)
    return model, tok


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
    from sharding.distributed import initialize
    try:
        initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except ValueError as e:
        sys.exit(f"error: {e}")
    from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig
    from jinfer.engine import Engine, enable_compilation_cache
    from jinfer.sampling_params import SamplingParams

    if FLAGS.compilation_cache:
        enable_compilation_cache(FLAGS.compilation_cache)  # before loading: its programs are cached too

    t0 = time.perf_counter()
    try:
        params = SamplingParams(temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k,
                                min_p=FLAGS.min_p, seed=FLAGS.seed, max_tokens=FLAGS.max_tokens,
                                n=FLAGS.n)
        mesh = None
        if FLAGS.tp > 1:
            from sharding.tp import make_mesh
            mesh = make_mesh(FLAGS.tp)
        model, tok = _load(mesh)
        engine = Engine(model, tok, CacheConfig(page_size=FLAGS.page_size, num_pages=FLAGS.num_pages or None),
                        SchedulerConfig(max_num_batched_tokens=FLAGS.max_num_batched_tokens,
                                        max_num_seqs=FLAGS.max_num_seqs, max_model_len=FLAGS.max_model_len),
                        options=EngineOptions(attention_backend=FLAGS.attention_backend), mesh=mesh)
        t1 = time.perf_counter()
        outputs = engine.generate(prompts, params)
    except ValueError as e:
        sys.exit(f"error: {e}")
    t2 = time.perf_counter()
    if FLAGS.process_id != 0:
        return  # every process computed the same outputs; process 0 reports them
    for i, out in enumerate(outputs):  # n per prompt, in prompt order
        prompt = prompts[i // FLAGS.n]
        if FLAGS.json:
            print(json.dumps({"prompt": prompt, "index": out.index, "token_ids": out.token_ids,
                              "text": out.text, "finish_reason": out.finish_reason}), file=report)
        else:
            sample = f" (sample {out.index})" if FLAGS.n > 1 else ""
            print(f"--- {prompt!r}{sample}\n{prompt}{out.text}\n[{len(out.token_ids)} tokens, "
                  f"finish={out.finish_reason}]", file=report)
    if not FLAGS.json:
        n = sum(len(o.token_ids) for o in outputs)
        print(f"load {t1 - t0:.2f}s; generate {t2 - t1:.2f}s for {n} tokens (includes compilation)",
              file=report)
    report.flush()


if __name__ == "__main__":
    app.run(main)
