"""Offline engine benchmark: throughput vs HF generate, start-up time, memory, distance to the
machine's matmul limit, host overhead vs a bare loop, prefix TTFT.

  python tools/bench_engine.py                       # full run, prints a markdown report
  python tools/bench_engine.py --out=benchmarks/engine.md
  python tools/bench_engine.py --smoke               # tiny sizes, under a minute (tests)

Needs the `test` extra (torch, transformers) for the HF baseline. Two models, each loaded by
both stacks from the same HF checkpoint: a random-weight Llama (26M parameters at the default
sizes) and the embedded test model (jinfer/test_model).

1. Start-up (benchmark model): wall time from spawning a fresh Python process to its first
   generated token, once with an empty JAX compilation cache and once with that cache warm.
2. Throughput: N requests with prompt and output lengths drawn uniformly (fixed seed), greedy,
   EOS ignored so every request emits exactly its output length. The engine gets them all at
   once, in a process of its own (its peak resident memory is reported); HF `generate` runs
   them in batches of --hf_batch_size, left-padded, each batch for its longest output (what a
   transformers user does). Output tokens/s counts only the requested tokens for both. The
   two alternate --repeats times; medians are reported.
3. Host overhead: B requests all decoding; engine.step() throughput against a bare Python loop
   over the same compiled step (same bucket, page tables and lengths, tokens fed back on
   device, no scheduler, no read-back). The bare step's FLOP/s is printed beside the FLOP/s of
   the same matmuls run alone (plain jnp), the machine's limit for this step.
4. Prefix cache: requests sharing a --prefix_len-token prefix arrive one after another; median
   time to first token with the prefix cache off and on.

With --backends (e.g. --backends=xla,pallas on a GPU) only one comparison runs, on a
random-weight Llama built in place (--hidden_size, --num_layers, --vocab_size, or a named
--preset shape such as the default model's; --dtype; no HF checkpoint, no baseline): for each
attention backend and each --backend_contexts length, --decode_batch requests decode;
engine.step() tokens/s against the bare loop over the same compiled step (as in 3.), medians of
--repeats alternating runs; beside it the engine's timed steps split on the host (dispatch, the
wait for the device, postprocess, the rest: PHASES), which tells whether the host work hides
behind the device step or adds to it; and a pipeline probe, the bare loop again with the
engine's read-back of each step one step late and then with its host work as busy time, which
tells what of the two delays the device. Then the parts of a bare decode step: the same step
with attention off (K/V still written) and its matmuls alone.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_requests", 64, "Requests in the throughput workload.", lower_bound=1)
flags.DEFINE_integer("min_prompt", 32, "Shortest prompt, tokens.", lower_bound=1)
flags.DEFINE_integer("max_prompt", 512, "Longest prompt, tokens.", lower_bound=1)
flags.DEFINE_integer("min_output", 16, "Shortest output, tokens.", lower_bound=1)
flags.DEFINE_integer("max_output", 256, "Longest output, tokens.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed for weights and the workload.")
flags.DEFINE_integer("hidden_size", 512, "Benchmark model width.")
flags.DEFINE_integer("num_layers", 6, "Benchmark model decoder layers.")
flags.DEFINE_integer("vocab_size", 8192, "Benchmark model vocabulary size.")
flags.DEFINE_string("preset", "", "--backends only: a named shape from jinfer.models.config.PRESETS (e.g. "
                    "smollm2-135m, the default model's) with random weights, in place of --hidden_size, "
                    "--num_layers and --vocab_size.")
flags.DEFINE_integer("hf_batch_size", 16, "Requests per HF generate call.", lower_bound=1)
flags.DEFINE_integer("max_num_batched_tokens", 512, "Engine token budget per step.")
flags.DEFINE_integer("max_num_seqs", 64, "Engine sequences per step.")
flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
flags.DEFINE_integer("decode_batch", 64, "Sequences in the host-overhead comparison.")
flags.DEFINE_integer("decode_steps", 96, "Steps timed in the host-overhead comparison.")
flags.DEFINE_integer("prefix_len", 1024, "Shared prefix of the TTFT workload, tokens.")
flags.DEFINE_integer("prefix_requests", 6, "Requests in the TTFT workload.", lower_bound=2)
flags.DEFINE_integer("repeats", 3, "Alternating runs of each comparison (engine / HF, bare loop / "
                     "engine); medians reported.",
                     lower_bound=1)
flags.DEFINE_list("backends", [], "Only compare these attention backends (e.g. xla,pallas): engine vs "
                  "bare decode loop on a random-weight model built in place.")
flags.DEFINE_list("backend_contexts", ["128", "2048"], "Prompt lengths of the --backends comparison.")
flags.DEFINE_list("launch_thread", ["false"], "--backends: run the engine with EngineOptions.launch_thread off "
                  "and/or on (e.g. false,true); rows with it on are labelled backend+launch-thread.")
flags.DEFINE_bool("host_profile", False, "--backends: after the timed runs, one more engine run per backend and "
                  "context under cProfile; the functions taking the most host time print to stderr (the "
                  "engine's thread only: with --launch_thread the launch itself is not in it).")
flags.DEFINE_bool("test_model", True, "Also measure the embedded test model.")
flags.DEFINE_bool("real_model", True, "Also measure the default model, SmolLM2-135M-Instruct (its GGUF file, "
                  "dequantized; HF loads the same file).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and KV dtype (HF too).")
flags.DEFINE_bool("smoke", False, "Tiny sizes for a quick end-to-end check.")
flags.DEFINE_string("out", "", "Also write the report to this markdown file.")
# Internal: the benchmark runs the engine in child processes of itself.
flags.DEFINE_enum("child", "", ["", "first_token", "throughput"], "Internal: run one engine part.")
flags.DEFINE_string("child_model", "", "Internal: checkpoint the child loads.")
flags.DEFINE_string("child_cache", "", "Internal: the child's compilation cache directory.")


def _smoke_sizes():
    for name, value in dict(num_requests=6, min_prompt=4, max_prompt=24, min_output=2, max_output=8,
                            hidden_size=64, num_layers=2, vocab_size=300, hf_batch_size=3,
                            max_num_batched_tokens=32, max_num_seqs=8, page_size=4, decode_batch=4,
                            decode_steps=4, prefix_len=24, prefix_requests=3, repeats=1, real_model=False).items():
        setattr(FLAGS, name, value)


def _max_len() -> int:
    return FLAGS.max_prompt + FLAGS.max_output


def _num_pages() -> int:
    pages_per_seq = -(-_max_len() // FLAGS.page_size)
    return pages_per_seq * (max(FLAGS.num_requests, FLAGS.decode_batch) + 1)


def _save_bench_model(path: str):
    """A random Llama saved as an HF checkpoint at path; returns the torch model."""
    import torch
    import transformers

    h = FLAGS.hidden_size
    config = transformers.LlamaConfig(
        vocab_size=FLAGS.vocab_size, hidden_size=h, intermediate_size=h * 11 // 4 // 64 * 64,
        num_hidden_layers=FLAGS.num_layers, num_attention_heads=max(1, h // 64),
        num_key_value_heads=max(1, h // 128), max_position_embeddings=4096,
        bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(FLAGS.seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model.to(getattr(torch, FLAGS.dtype))


def _workload(seed: int, vocab_size: int):
    import numpy as np
    rng = np.random.default_rng(seed)
    n = FLAGS.num_requests
    prompt_lens = rng.integers(FLAGS.min_prompt, FLAGS.max_prompt + 1, n)
    out_lens = rng.integers(FLAGS.min_output, FLAGS.max_output + 1, n)
    prompts = [rng.integers(0, vocab_size, int(p)).tolist() for p in prompt_lens]
    return prompts, [int(o) for o in out_lens]


def _hf_throughput(hf, prompts, out_lens, sort: bool = False) -> float:
    """Output tokens/s of batched HF greedy generate (left padding; each batch generates its
    longest output for every row, and only the requested tokens count). sort: batches formed
    in order of output length, so a batch wastes little on rows that are already done."""
    import torch
    torch.set_num_threads(os.cpu_count())
    bs = FLAGS.hf_batch_size
    if sort:
        order = sorted(range(len(prompts)), key=lambda i: out_lens[i])
        prompts, out_lens = [prompts[i] for i in order], [out_lens[i] for i in order]
    start = time.perf_counter()
    for i in range(0, len(prompts), bs):
        batch, outs = prompts[i:i + bs], out_lens[i:i + bs]
        width = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=max(outs), min_new_tokens=max(outs),
                        do_sample=False, pad_token_id=0, eos_token_id=None)
    return sum(out_lens) / (time.perf_counter() - start)


def _engine(model, tok, *, max_model_len, num_pages, prefix=True, async_scheduling=True):
    from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig
    from jinfer.engine import Engine
    return Engine(model, tok, CacheConfig(page_size=FLAGS.page_size, num_pages=num_pages,
                                          enable_prefix_cache=prefix),
                  SchedulerConfig(max_num_batched_tokens=FLAGS.max_num_batched_tokens,
                                  max_num_seqs=FLAGS.max_num_seqs, max_model_len=max_model_len),
                  options=EngineOptions(async_scheduling=async_scheduling))


def _load(path: str):
    import jax.numpy as jnp

    from jinfer.loader.gguf import find_gguf
    from jinfer.loader.hf import load_hf_model
    from jinfer.tokenizer import Tokenizer, byte_level_tokenizer
    if find_gguf(path):
        from jinfer.launch import ModelSpec, load_model
        return load_model(ModelSpec(path=path, dtype=FLAGS.dtype))
    model = load_hf_model(path, dtype=jnp.dtype(FLAGS.dtype))
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return model, Tokenizer.from_dir(path)
    return model, byte_level_tokenizer()  # ids past its 258 tokens decode to nothing; text unused


def _engine_throughput(engine, prompts, out_lens) -> float:
    from jinfer.sampling_params import SamplingParams
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in out_lens]
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert [len(o.token_ids) for o in outs] == out_lens
    return sum(out_lens) / elapsed


# -- children: the engine in a fresh process ------------------------------------------------

def _child_first_token():
    """Loads the checkpoint, generates until the first token, says so on stdout at once."""
    from jinfer.engine import enable_compilation_cache
    from jinfer.sampling_params import SamplingParams
    if FLAGS.child_cache:
        enable_compilation_cache(FLAGS.child_cache)
    model, tok = _load(FLAGS.child_model)
    engine = _engine(model, tok, max_model_len=_max_len(), num_pages=_num_pages())
    prompt = [i % model.config.vocab_size for i in range(1, min(64, _max_len() - 2) + 1)]
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    while not any(o.new_token_ids for o in engine.step()):
        pass
    print("FIRST_TOKEN", flush=True)


def _child_throughput():
    """The throughput workload in this process; prints tok/s and peak resident memory (JSON)."""
    from jinfer.engine import enable_compilation_cache
    if FLAGS.child_cache:
        enable_compilation_cache(FLAGS.child_cache)
    model, tok = _load(FLAGS.child_model)
    prompts, out_lens = _workload(FLAGS.seed, model.config.vocab_size)
    engine = _engine(model, tok, max_model_len=_max_len(), num_pages=_num_pages())
    engine.runner.warmup()  # every bucket; compiled (or read from the cache) before timing
    tps = _engine_throughput(engine, prompts, out_lens)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"tok_s": tps, "peak_rss_mib": peak}), flush=True)


def _spawn(mode: str, model_path: str, cache: str) -> subprocess.Popen:
    args = [sys.executable, os.path.abspath(__file__), f"--child={mode}", f"--child_model={model_path}",
            f"--child_cache={cache}", *[a for a in sys.argv[1:] if not a.startswith("--out")]]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _start_to_first_token(model_path: str, cache: str) -> float:
    """Seconds from spawning a process to its first token."""
    start = time.perf_counter()
    proc = _spawn("first_token", model_path, cache)
    for line in proc.stdout:
        if line.startswith("FIRST_TOKEN"):
            elapsed = time.perf_counter() - start
            break
    else:
        raise RuntimeError(f"first-token child exited with {proc.wait()} before a token:\n"
                           f"{proc.stderr.read()[-3000:]}")
    proc.communicate()
    return elapsed


def _child_engine_throughput(model_path: str, cache: str) -> dict:
    proc = _spawn("throughput", model_path, cache)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"throughput child exited with {proc.returncode}:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


# -- host overhead and distance to the matmul limit ------------------------------------------

def _prefill_lead(batch: int, prompt_len: int) -> int:
    """Steps the first request can decode before the last one has its first token: the batch's
    prompts go through in chunks of the step budget (plus slack for the pipeline)."""
    return -(-batch * prompt_len // FLAGS.max_num_batched_tokens) + 4


def _engine_decode_rate(engine, batch: int, steps: int, prompt_len: int, phases: dict | None = None,
                        profile=None) -> float:
    """engine.step() tokens/s once `batch` requests are all decoding. Requests ask for as many
    tokens as max_model_len allows, so the ones prefilled first are still running when the last
    gets its first token; every timed step is checked to carry exactly the `batch` one-token
    decodes (ValueError otherwise), and the requests are aborted after timing.

    With `phases`, each timed step's seconds are appended under PHASES' keys: the whole call,
    dispatch (prepare + launch), the wait for the step read back, and the rest of postprocess.
    With `profile` (a cProfile.Profile), the timed steps run under it."""
    from jinfer.sampling_params import SamplingParams
    max_tokens, need = engine.sched_cfg.max_model_len - prompt_len, steps + 2 + _prefill_lead(batch, prompt_len)
    if max_tokens < need:
        raise ValueError(f"max_model_len={engine.sched_cfg.max_model_len} leaves {max_tokens} tokens after a "
                         f"{prompt_len}-token prompt; {batch} requests decoding together for {steps} steps need {need}")
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request([(7 * i + j) % engine.model_config.vocab_size for j in range(prompt_len)], params)
           for i in range(batch)]
    first = set()
    while len(first) < batch:  # prefill until every request has its first token
        first.update(o.request_id for o in engine.step() if o.token_ids)
    engine.step()  # settle the pipeline
    shapes, runner = [], engine.runner
    dispatch, fetch, postprocess, prepare = runner.dispatch, runner.fetch, engine._postprocess, runner.prepare
    spent = dict.fromkeys(PHASES, 0.0)

    def timed(name, fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t0
        return call

    runner.dispatch = timed("dispatch", lambda plan: shapes.append((plan.num_tokens, len(plan.seqs))) or dispatch(plan))
    runner.fetch = timed("wait", fetch)
    engine._postprocess = timed("postprocess", postprocess)
    runner.prepare = timed("prepare", prepare)
    emitted, elapsed = 0, 0.0
    try:
        if profile is not None:
            profile.enable()
        for _ in range(steps):
            spent.update(dict.fromkeys(PHASES, 0.0))
            t0 = time.perf_counter()
            emitted += sum(len(o.new_token_ids) for o in engine.step())
            spent["step"] = time.perf_counter() - t0
            elapsed += spent["step"]
            spent["postprocess"] -= spent["wait"]
            for name in PHASES if phases is not None else ():
                phases.setdefault(name, []).append(spent[name])
    finally:
        if profile is not None:
            profile.disable()
        runner.dispatch, runner.fetch, engine._postprocess, runner.prepare = dispatch, fetch, postprocess, prepare
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    engine.step()
    if any(shape != (batch, batch) for shape in shapes):
        raise ValueError(f"timed steps were not {batch} decodes each: (tokens, sequences) = {shapes}")
    return emitted / elapsed


def _print_host_profile(engine, batch: int, steps: int, prompt_len: int, label: str) -> None:
    """One more engine run's timed steps under cProfile: the top functions by own and by
    cumulative time, per step (the profiler's overhead included), to stderr."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    _engine_decode_rate(engine, batch, steps, prompt_len, profile=prof)
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(25)
        print(f"host profile ({label}, {steps} steps, by {key}):\n{out.getvalue()}", file=sys.stderr, flush=True)


# engine.step() split into: the whole call; dispatch (prepare the arrays, launch the step); the
# wait for the previous step's tokens (async scheduling: the step launched one call earlier);
# the rest of postprocess (verify, scheduler update, detokenize, outputs). Schedule and the
# step's own bookkeeping are what is left of "step". Prepare is the part of dispatch that builds
# the step's arrays; the rest of dispatch is the launch (a launch that waits for the device,
# instead of returning at once, shows here). With the launch thread the rest is the wait for
# the previous step's launch to finish there, and handing this one over.
PHASES = ("step", "dispatch", "wait", "postprocess", "prepare")


def _host_seconds(phases: dict) -> float:
    """Median host work per timed step: the step call less its wait for the device."""
    return statistics.median(s - w for s, w in zip(phases["step"], phases["wait"]))


def _error_row(backend: str, context: int, err: Exception) -> str:
    return f"| {backend} | {context} | error: {type(err).__name__}: {str(err)[:300].replace(chr(10), ' ')} | | | | |"


def _phase_row(phases: dict) -> str:
    """Median ms per timed step of each phase, and the host work left beside the wait."""
    med = {name: statistics.median(phases[name]) * 1e3 for name in PHASES}
    rest = statistics.median(s - d - w - p for s, d, w, p in zip(*(phases[name] for name in PHASES[:4]))) * 1e3
    host = _host_seconds(phases) * 1e3
    launch = statistics.median(d - p for d, p in zip(phases["dispatch"], phases["prepare"])) * 1e3
    return (f"{med['step']:.2f} | {med['dispatch']:.2f} | {med['wait']:.2f} | {med['postprocess']:.2f} | "
            f"{rest:.2f} | {host:.2f} | {med['prepare']:.2f} | {launch:.2f}")


def _probe_row(runner, backend: str, batch: int, steps: int, prompt_len: int, phases: dict) -> str:
    """The pipeline probe's row: ms per step of the bare loop plain, with the late read-back
    (asked at the read, started at launch), and the latter with the engine's host work (its
    median step - wait from `phases`); medians of --repeats alternating runs."""
    host_s = _host_seconds(phases)
    variants = (("", 0.0), ("late", 0.0), ("launch", 0.0), ("launch", host_s))
    runs = [[batch / _bare_decode_rate(runner, batch, steps, prompt_len, mode, work, each=False)[0] * 1e3
             for mode, work in variants] for _ in range(FLAGS.repeats)]
    cells = [f"{statistics.median(ms):.2f}" for ms in zip(*runs)] + [f"{host_s * 1e3:.2f}"]
    return f"| {backend} | {prompt_len} | " + " | ".join(cells) + " |"


def _bare_decode_rate(runner, batch: int, steps: int, prompt_len: int, read_back: str = "",
                      host_s: float = 0.0, each: bool = True) -> tuple[float, float]:
    """The same compiled step in a bare loop: no scheduler, ids fed back on device.
    Returns (tokens/s, median seconds per step); each=False skips the second pass that times
    each step alone (the median is then NaN).

    read_back: "" none; "late" reads each step's ids and logprobs on the host after the next
    step is launched, as the engine's async pipeline does, the copy asked for only then;
    "launch" the same with the copy started as each step is launched (what the runner does).
    host_s: seconds of host work per step, the wait for the read-back not counted (as the
    engine's step - wait): after the read, busy Python time (holding the GIL, as the engine's
    postprocess does) tops the step's host time up to host_s while the step just launched runs.
    Together they tell whether a read-back or host work delays the device steps."""
    import jax
    import numpy as np

    from jinfer.attention import AttentionMetadata
    from jinfer.sampling import SamplingArrays
    from jinfer.sampling_params import SamplingParams
    from jinfer.step_plan import ScheduledSeq

    t, s = runner.bucket(batch)
    pages_needed = -(-(prompt_len + steps + 2) // runner.page_size)
    table = np.zeros((s, runner.pages_per_seq), np.int32)
    table[:batch, :pages_needed] = np.arange(batch * pages_needed).reshape(batch, pages_needed)
    cu = np.zeros(s + 1, np.int32)
    cu[1:batch + 1] = np.arange(1, batch + 1)
    cu[batch + 1:] = batch
    feed = np.full(t, -1, np.int32)
    feed[:batch] = np.arange(batch)  # each row takes the id its sequence sampled last step
    row_seq = np.full(s, s, np.int32)
    row_seq[:batch] = np.arange(batch)
    logits_idx = np.zeros(s, np.int32)
    logits_idx[:batch] = np.arange(batch)
    seq = ScheduledSeq("x", (0,), 0, (), True, SamplingParams(temperature=0), 0, 0, 0)
    samp = SamplingArrays.from_seqs([seq] * batch, s)
    ids = np.zeros(t, np.int32)
    ids[:batch] = -1  # PENDING: fed from the last step's samples
    decode_only = bool(runner.decode_steps)  # the variant the engine's decode-only steps take
    fn = runner._compiled.get((t, s, decode_only, False), runner._step)
    times = []

    def run(n, start_len, block_each=False):
        prev, pending = runner._prev_tokens, None
        for i in range(n):
            t0 = time.perf_counter()
            kv_len = start_len + i + 1
            pos = np.zeros(t, np.int32)
            pos[:batch] = kv_len - 1
            kv_lens = np.zeros(s, np.int32)
            kv_lens[:batch] = kv_len
            md = AttentionMetadata(cu, kv_lens, table, np.array([batch], np.int32), decode_only)
            tokens, logprobs, runner.kv, prev = fn(runner.state, runner.kv, prev, ids, feed, pos, md, logits_idx,
                                                   samp, row_seq, None)  # (None: no drafts)
            if read_back == "launch":
                tokens.copy_to_host_async()
                logprobs.copy_to_host_async()
            waited = time.perf_counter()
            if pending is not None:  # the step launched one iteration earlier
                np.asarray(pending[0]), np.asarray(pending[1])
            waited = time.perf_counter() - waited
            pending = (tokens, logprobs) if read_back else None
            while time.perf_counter() - t0 - waited < host_s:  # host time, as the engine's step - wait
                pass
            if block_each:
                jax.block_until_ready(tokens)
                times.append(time.perf_counter() - t0)
        jax.block_until_ready(prev)

    run(2, prompt_len)  # compile / warm
    start = time.perf_counter()
    run(steps, prompt_len + 2)  # dispatched back to back, as a serving loop would
    rate = batch * steps / (time.perf_counter() - start)
    if not each:
        return rate, float("nan")
    run(steps, prompt_len + 2, block_each=True)  # the same steps again, each timed alone
    return rate, statistics.median(times)


def step_matmul_flops(cfg, rows: int, context: int) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) of one step of `rows` single-token sequences that each
    attend over `context` keys: 2 per multiply-add; LM head on every row."""
    e, h, n, k = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    per_layer = e * (n + 2 * k) * h + n * h * e + 3 * e * cfg.intermediate_size
    matmul = 2 * rows * (cfg.num_layers * per_layer + e * cfg.vocab_size)
    attention = 2 * 2 * rows * context * n * h * cfg.num_layers
    return float(matmul), float(attention)


def _matmul_limit_seconds(cfg, rows: int, dtype) -> float:
    """Median time of the step's matmuls alone, plain jnp on this device (the same shapes)."""
    import jax
    import jax.numpy as jnp
    e, h, n, k, m = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    shapes = [(e, n * h), (e, k * h), (e, k * h), (n * h, e), (e, m), (e, m), (m, e)] * cfg.num_layers
    weights = [jnp.full(s, 0.01, dtype) for s in shapes] + [jnp.full((e, cfg.vocab_size), 0.01, dtype)]
    inputs = {d: jnp.ones((rows, d), dtype) for d in {w.shape[0] for w in weights}}

    @jax.jit
    def chain(inputs, weights):
        return [inputs[w.shape[0]] @ w for w in weights]

    jax.block_until_ready(chain(inputs, weights))
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        jax.block_until_ready(chain(inputs, weights))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _NoAttention:
    """Attention replaced by its queries (K/V still written): the step without attention, to
    show attention's share of it. Benchmark-only; outputs are meaningless."""

    decode_path = False

    def __call__(self, q, k, v, k_pages, v_pages, md, *, sm_scale, sliding_window):
        from jinfer.attention.xla import write_kv
        k_pages, v_pages = write_kv(k_pages, v_pages, k, v, md)
        return q, k_pages, v_pages


def _step_breakdown(model, tok, prompts, out_lens) -> list[tuple[str, int, float, float]]:
    """The throughput workload again, each step timed alone (sync scheduling, read back before
    the next): (kind and bucket, steps, total s, median ms per step), kind = mixed (some
    sequence computes several tokens) or decode."""
    from jinfer.sampling_params import SamplingParams
    engine = _engine(model, tok, max_model_len=_max_len(), num_pages=_num_pages(), async_scheduling=False)
    runner, times = engine.runner, {}
    dispatch = runner.dispatch

    def timed(plan):
        key = ("mixed" if plan.num_tokens > len(plan.seqs) else "decode", runner.bucket(plan.num_tokens)[0])
        t0 = time.perf_counter()
        handle = dispatch(plan)
        handle[0].block_until_ready()
        times.setdefault(key, []).append(time.perf_counter() - t0)
        return handle

    engine.generate(prompts[:4], [SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)] * 4)
    runner.warmup()
    engine.scheduler.prefix_cache.clear()
    runner.dispatch = timed
    engine.generate(prompts, [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in out_lens])
    return [(f"{kind} steps, {t}-token bucket", len(v), sum(v), statistics.median(v) * 1e3)
            for (kind, t), v in sorted(times.items())]


def _bare_step(build, backend: str, batch: int, steps: int, prompt_len: int) -> float:
    """Median bare decode step (s) of the engine build(backend) returns; backend "none" is the
    step with attention off (_NoAttention)."""
    from jinfer.attention import register_backend
    register_backend("none", _NoAttention)
    return _bare_decode_rate(build(backend).runner, batch, steps, prompt_len)[1]


def _attention_share(model, tok, batch: int, steps: int, prompt_len: int) -> tuple[float, float]:
    """Median bare decode step (s) with the xla backend and with attention off."""
    from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig
    from jinfer.engine import Engine
    from jinfer.models.llama import set_attention_backend

    def build(backend):
        return Engine(model, tok, CacheConfig(page_size=FLAGS.page_size, num_pages=_num_pages()),
                      SchedulerConfig(max_num_batched_tokens=FLAGS.max_num_batched_tokens,
                                      max_num_seqs=FLAGS.max_num_seqs, max_model_len=_max_len()),
                      options=EngineOptions(attention_backend=backend))

    out = [_bare_step(build, backend, batch, steps, prompt_len) for backend in ("xla", "none")]
    set_attention_backend(model, "xla")
    return out[0], out[1]


def _prefix_ttft(model, tok, rng, prefix: bool) -> float:
    """Median TTFT (s) of requests sharing a long prefix, sent one after another."""
    from jinfer.sampling_params import SamplingParams
    suffix, out = 32, 8
    max_len = FLAGS.prefix_len + suffix + out
    pages = 2 * (-(-max_len // FLAGS.page_size)) * (FLAGS.prefix_requests + 2)
    engine = _engine(model, tok, max_model_len=max_len, num_pages=pages, prefix=prefix)
    params = SamplingParams(temperature=0, max_tokens=out, ignore_eos=True)

    def prompts(n):
        shared = rng.integers(0, FLAGS.vocab_size, FLAGS.prefix_len).tolist()
        return [shared + rng.integers(0, FLAGS.vocab_size, suffix).tolist() for _ in range(n)]

    for p in prompts(2):  # compile the miss and hit paths on another prefix
        engine.generate([p], params)
    ttfts = []
    for p in prompts(FLAGS.prefix_requests):
        o = engine.generate([p], params)[0]
        ttfts.append(o.first_token_time - o.arrival_time)
    return statistics.median(ttfts[1:])  # the first request of the prefix is a miss either way


def _backend_comparison() -> str:
    """Engine vs bare decode loop per attention backend and context (see the module doc)."""
    import jax
    import jax.numpy as jnp

    from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig
    from jinfer.engine import Engine
    from jinfer.models.config import preset, scaled_llama
    from jinfer.models.llama import init_model
    from jinfer.tokenizer import byte_level_tokenizer

    if FLAGS.preset:
        cfg = preset(FLAGS.preset)
    else:
        cfg = scaled_llama(FLAGS.hidden_size, FLAGS.num_layers, FLAGS.vocab_size)
    start = time.perf_counter()
    model = init_model(cfg, seed=FLAGS.seed, dtype=jnp.dtype(FLAGS.dtype))
    jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
    print(f"model: {cfg.num_params() / 1e9:.2f}B parameters, built in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)
    tok = byte_level_tokenizer()
    b, n = FLAGS.decode_batch, FLAGS.decode_steps
    contexts = [int(c) for c in FLAGS.backend_contexts]
    max_len = max(contexts) + n + 16 + _prefill_lead(b, max(contexts))
    pages = b * -(-max_len // FLAGS.page_size) + 1
    lines = ["| backend | context | bare loop tok/s | engine tok/s | engine / bare | bare step ms | "
             "first pass s (compiles) |", "|---|---:|---:|---:|---:|---:|---:|"]

    def build(backend, launch_thread=False):
        return Engine(model, tok, CacheConfig(page_size=FLAGS.page_size, num_pages=pages, enable_prefix_cache=False),
                      SchedulerConfig(max_num_batched_tokens=FLAGS.max_num_batched_tokens, max_num_seqs=b,
                                      max_model_len=max_len),
                      options=EngineOptions(attention_backend=backend, launch_thread=launch_thread))

    host_lines = ["| backend | context | bare step ms | step ms | dispatch ms | wait ms | postprocess ms | rest ms | "
                  "host ms (step - wait) | of dispatch: prepare ms | of dispatch: launch ms |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    probe_lines = ["| backend | context | bare ms | read back late ms | read back from launch ms | "
                   "the same + host work ms | host work ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    threads = [flags.BooleanParser().parse(x) for x in FLAGS.launch_thread]
    for backend, thread in [(name, t) for name in FLAGS.backends for t in threads]:
        engine, label = build(backend, thread), backend + ("+launch-thread" if thread else "")
        for plen in contexts:
            try:
                t0 = time.perf_counter()
                _engine_decode_rate(engine, b, 4, plen)  # compiles the prefill and decode steps
                first = time.perf_counter() - t0
                bares, engs, steps, phases = [], [], [], {}
                for _ in range(FLAGS.repeats):
                    rate, step = _bare_decode_rate(engine.runner, b, n, plen)
                    bares.append(rate)
                    steps.append(step)
                    engs.append(_engine_decode_rate(engine, b, n, plen, phases))
                ratio = statistics.median(e / x for e, x in zip(engs, bares))
                bare_ms = statistics.median(steps) * 1e3
                lines.append(f"| {label} | {plen} | {statistics.median(bares):,.0f} | "
                             f"{statistics.median(engs):,.0f} | {ratio:.2f} | {bare_ms:.2f} | {first:.1f} |")
                host_lines.append(f"| {label} | {plen} | {bare_ms:.2f} | {_phase_row(phases)} |")
                print(host_lines[-1], file=sys.stderr, flush=True)
            except Exception as err:  # noqa: BLE001 - reported, the other backends still run
                lines.append(_error_row(label, plen, err))
                print(lines[-1], file=sys.stderr, flush=True)
                continue
            print(lines[-1], file=sys.stderr, flush=True)
            try:
                if FLAGS.host_profile:
                    _print_host_profile(engine, b, n, plen, f"{label}, context {plen}")
                probe_lines.append(_probe_row(engine.runner, label, b, n, plen, phases))
            except Exception as err:  # noqa: BLE001 - the tables above stand without it
                probe_lines.append(_error_row(label, plen, err))
            print(probe_lines[-1], file=sys.stderr, flush=True)
        del engine
    device = jax.devices()[0]
    shape = f" of the {FLAGS.preset} shape" if FLAGS.preset else ""
    lines += ["", f"Device: {device.device_kind} ({device.platform}); jax {jax.__version__}. Model: random-weight "
                  f"Llama{shape}, {cfg.num_params() / 1e9:.2f}B parameters (hidden {cfg.hidden_size}, "
                  f"{cfg.num_layers} layers, {cfg.num_heads} heads, {cfg.num_kv_heads} KV heads, head_dim "
                  f"{cfg.head_dim}, vocab {cfg.vocab_size}), {FLAGS.dtype}; batch {b}, {n} timed decode steps, "
                  f"page size {FLAGS.page_size}, step budget {FLAGS.max_num_batched_tokens} tokens; medians of "
                  f"{FLAGS.repeats} alternating runs."]
    lines += ["", "The engine's timed steps on the host (medians per step; see PHASES in the script): dispatch = "
                  "prepare + launch, wait = reading back the step launched one call earlier, postprocess = the "
                  "rest of it, rest = schedule and bookkeeping. With the host hidden behind the device, step is "
                  "about the bare step and wait takes up the difference; a launch that takes about a device "
                  "step waits for the device.", "", *host_lines]
    lines += ["", "Pipeline probe (medians of --repeats alternating runs): the bare loop's steps back to back "
                  "(ms per step, run beside the others), then the same loop reading "
                  "each step's ids and logprobs on the host one step late as the engine does (the copy asked for "
                  "at the read, or started at launch as the runner does), then with the engine's host work (its "
                  "median step - wait above): after each read, busy Python time tops the step's host time (the read's "
                  "wait not counted) up to that. A read-back or host work that hides behind the device leaves the "
                  "bare time (max(bare, host work) with both).",
              "", *probe_lines]
    # Where a bare step's time goes: the same step with attention replaced by its queries (K/V
    # still written), and the step's matmuls alone as plain jnp.
    try:
        off = _bare_step(build, "none", b, n, contexts[0])
        matmuls = _matmul_limit_seconds(cfg, b, jnp.dtype(FLAGS.dtype))
        lines += ["", f"Parts of the batch-{b} decode step (bare loop): attention off (K/V still written) "
                      f"{off * 1e3:.2f} ms; the step's matmuls alone (plain jnp, same shapes) {matmuls * 1e3:.2f} ms."]
    except Exception as err:  # noqa: BLE001 - the table above stands without it
        lines += ["", f"Parts of the decode step: error: {type(err).__name__}: {str(err)[:300]}"]
    print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.smoke:
        _smoke_sizes()
    if FLAGS.min_prompt > FLAGS.max_prompt or FLAGS.min_output > FLAGS.max_output:
        raise app.UsageError("need min_prompt <= max_prompt and min_output <= max_output")
    if FLAGS.child == "first_token":
        return _child_first_token()
    if FLAGS.child == "throughput":
        return _child_throughput()
    if FLAGS.backends:
        table = _backend_comparison()
        print(table)
        if FLAGS.out:
            with open(FLAGS.out, "w") as f:
                f.write("```sh\npython " + " ".join(["tools/bench_engine.py", *sys.argv[1:]]) + "\n```\n\n"
                        + table + "\n")
        return None
    import jax
    import numpy as np
    import transformers

    from jinfer import TEST_MODEL_DIR

    rows = []

    def report(name, value, unit):
        rows.append((name, value, unit))
        print(f"{name}: {value:.3f} {unit}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        bench_path = os.path.join(tmp, "bench_model")
        hf_bench = _save_bench_model(bench_path)
        cache = os.path.join(tmp, "xla_cache")
        report("start to first token, empty compilation cache", _start_to_first_token(bench_path, cache), "s")
        report("start to first token, compilation cache warm", _start_to_first_token(bench_path, cache), "s")

        models = [("benchmark model", bench_path, hf_bench)]
        if FLAGS.real_model:
            import torch

            from jinfer.model_store import resolve_model_path
            gguf_path = resolve_model_path("")
            hf_real = transformers.AutoModelForCausalLM.from_pretrained(
                os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                dtype=getattr(torch, FLAGS.dtype)).eval()
            models.append(("SmolLM2-135M-Instruct", gguf_path, hf_real))
        if FLAGS.test_model:
            import torch
            hf_test = transformers.LlamaForCausalLM.from_pretrained(
                TEST_MODEL_DIR, torch_dtype=getattr(torch, FLAGS.dtype)).eval()
            models.append(("test model", TEST_MODEL_DIR, hf_test))
        for label, path, hf in models:
            prompts, out_lens = _workload(FLAGS.seed, hf.config.vocab_size)
            eng, hfs, sorted_hfs, ratios, sorted_ratios, peaks = [], [], [], [], [], []
            for _ in range(FLAGS.repeats):
                res = _child_engine_throughput(path, cache)
                eng.append(res["tok_s"])
                peaks.append(res["peak_rss_mib"])
                hfs.append(_hf_throughput(hf, prompts, out_lens))
                sorted_hfs.append(_hf_throughput(hf, prompts, out_lens, sort=True))
                ratios.append(eng[-1] / hfs[-1])
                sorted_ratios.append(eng[-1] / sorted_hfs[-1])
            report(f"{label}: engine output tokens/s", statistics.median(eng), "tok/s")
            report(f"{label}: HF generate output tokens/s (batch {FLAGS.hf_batch_size})",
                   statistics.median(hfs), "tok/s")
            report(f"{label}: HF generate output tokens/s (batch {FLAGS.hf_batch_size}, batches sorted by "
                   "output length)", statistics.median(sorted_hfs), "tok/s")
            report(f"{label}: engine / HF generate", statistics.median(ratios), "x")
            report(f"{label}: engine / HF generate with sorted batches", statistics.median(sorted_ratios), "x")
            report(f"{label}: engine process peak resident memory", max(peaks), "MiB")
        del models, hf_bench

        model, tok = _load(bench_path)
    cfg = model.config
    b, n = FLAGS.decode_batch, FLAGS.decode_steps
    max_len = _max_len()
    engine = _engine(model, tok, max_model_len=max_len, num_pages=_num_pages())
    sync = _engine(model, tok, max_model_len=max_len, num_pages=_num_pages(), async_scheduling=False)
    plen = max(1, min(32, max_len - n - 2 - _prefill_lead(b, 32)))  # room for the prefill lead and timed steps
    bares, steps, asyncs, syncs, phases = [], [], [], [], {"async": {}, "sync": {}}
    for _ in range(FLAGS.repeats):  # alternating, so drifts of a noisy machine hit all three
        rate, step = _bare_decode_rate(engine.runner, b, n, plen)
        bares.append(rate)
        steps.append(step)
        engine.scheduler.prefix_cache.clear()  # the bare loop wrote pages without the scheduler
        asyncs.append(_engine_decode_rate(engine, b, n, plen, phases["async"]))
        syncs.append(_engine_decode_rate(sync, b, n, plen, phases["sync"]))
    bare, bare_step = statistics.median(bares), statistics.median(steps)
    report(f"bare jitted decode loop, batch {b}", bare, "tok/s")
    matmul, attention = step_matmul_flops(cfg, b, plen + n // 2)
    limit = _matmul_limit_seconds(cfg, b, jax.numpy.dtype(FLAGS.dtype))
    report(f"bare decode step, batch {b}: achieved FLOP/s (matmuls + attention)",
           (matmul + attention) / bare_step / 1e9, "GFLOP/s")
    report("the step's matmuls alone (plain jnp, same shapes): FLOP/s", matmul / limit / 1e9, "GFLOP/s")
    report("bare step time / its matmuls' time", bare_step / limit, "x")
    for name, rates in (("async", asyncs), ("sync", syncs)):
        rate = statistics.median(rates)
        report(f"engine decode, batch {b} ({name} scheduling)", rate, "tok/s")
        ratios = [r / x for r, x in zip(rates, bares)]
        report(f"engine ({name}) / bare loop, median of {FLAGS.repeats}", statistics.median(ratios), "x")
        report(f"engine ({name}) / bare loop, worst of {FLAGS.repeats}", min(ratios), "x")
        report(f"host overhead per step ({name})", max(0.0, b / rate - b / bare) * 1e3, "ms")
        report(f"engine step ({name}): host work, the step call less its wait for the device",
               _host_seconds(phases[name]) * 1e3, "ms")
        report(f"engine step ({name}): waiting for the device", statistics.median(phases[name]["wait"]) * 1e3, "ms")
    del sync, engine
    ctx = _max_len() // 2
    with_attn, without = _attention_share(model, tok, b, n, max(1, min(ctx, max_len - 2 * n - 10)))
    report(f"bare decode step, batch {b}, context ~{ctx}: with attention", with_attn * 1e3, "ms")
    report(f"bare decode step, batch {b}, context ~{ctx}: attention off (K/V still written)", without * 1e3, "ms")
    prompts, out_lens = _workload(FLAGS.seed, cfg.vocab_size)
    breakdown = _step_breakdown(model, tok, prompts, out_lens)

    rng = np.random.default_rng(FLAGS.seed + 1)
    off = _prefix_ttft(model, tok, rng, prefix=False)
    report(f"median TTFT, {FLAGS.prefix_len}-token shared prefix, prefix cache off", off * 1e3, "ms")
    on = _prefix_ttft(model, tok, rng, prefix=True)
    report(f"median TTFT, {FLAGS.prefix_len}-token shared prefix, prefix cache on", on * 1e3, "ms")
    report("TTFT off / on", off / on, "x")

    device = jax.devices()[0]
    lines = [
        "| measure | value | unit |", "|---|---:|---|",
        *[f"| {name} | {value:,.2f} | {unit} |" for name, value, unit in rows],
        "",
        f"Device: {device.device_kind} ({device.platform}), {os.cpu_count()} CPU cores; "
        f"jax {jax.__version__}; torch {__import__('torch').__version__}; "
        f"transformers {transformers.__version__}; Python {platform.python_version()}.",
        f"Benchmark model: Llama, {cfg.num_params() / 1e6:.1f}M parameters (hidden {FLAGS.hidden_size}, "
        f"{FLAGS.num_layers} layers, vocab {FLAGS.vocab_size}), random weights, {FLAGS.dtype}. "
        "Test model: jinfer/test_model (5.1M parameters, vocab 4096).",
        f"Workload: {FLAGS.num_requests} requests, prompts {FLAGS.min_prompt}-{FLAGS.max_prompt}, "
        f"outputs {FLAGS.min_output}-{FLAGS.max_output} tokens, seed {FLAGS.seed}; engine budget "
        f"{FLAGS.max_num_batched_tokens} tokens / {FLAGS.max_num_seqs} sequences per step, "
        f"page size {FLAGS.page_size}, attention backend {jax.default_backend() == 'gpu' and 'pallas' or 'xla'}; "
        f"medians of {FLAGS.repeats} alternating runs.",
    ]
    lines += ["", "Where the time goes (benchmark model, the throughput workload with each step timed alone, "
              "sync scheduling):", "", "| steps | count | total s | median ms/step |", "|---|---:|---:|---:|",
              *[f"| {name} | {count} | {total:.2f} | {median:.1f} |" for name, count, total, median in breakdown]]
    report_md = "\n".join(lines)
    print(report_md)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write("# Engine benchmark\n\n```sh\npython " + " ".join(["tools/bench_engine.py", *sys.argv[1:]])
                    + "\n```\n\n" + report_md + "\n")


if __name__ == "__main__":
    app.run(main)
