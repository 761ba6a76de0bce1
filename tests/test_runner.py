"""Runner buckets and ahead-of-time warm-up."""

import json
import os
import re
import subprocess
import sys
import textwrap
import urllib.request

import numpy as np
import pytest

from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.runner import buckets, pick_bucket
from jinfer.sampling_params import SamplingParams
from jinfer.tokenizer import Tokenizer

# Tools run in their own process on one device, compiled without XLA's backend optimizations
# as every test is (the Makefile's XLA_TEST_FLAGS): they check what is reported, not its speed.
ONE_DEVICE = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}


def test_buckets_are_powers_of_two_capped_by_the_limit():
    assert buckets(48, smallest=16) == (16, 32, 48)
    assert buckets(1) == (1,)
    assert pick_bucket(17, (16, 32, 48)) == 32


def test_warmup_compiles_every_bucket_and_steps_reuse_them(hf_checkpoints):
    path = hf_checkpoints["llama3"]
    eng = Engine(load_hf_model(path), Tokenizer.from_dir(path), CacheConfig(page_size=4, num_pages=32),
                 SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=48),
                 options=EngineOptions(warmup=True, attention_backend="xla"))  # "" picks pallas on a GPU
    runner = eng.runner
    plain = {(16, 4, False, False), (32, 4, False, False)}  # one program per token bucket; seqs tied to it
    assert runner.compiled_buckets() == plain  # the xla backend has no decode path
    runner.decode_steps = True  # what the pallas backend asks for: + decode-only variants
    assert set(runner.bucket_keys()) == plain | {(16, 4, True, False)}
    runner.decode_steps = False
    traces = runner.traced_steps()
    out = eng.generate([[1, 2, 3], list(range(20))], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [6, 6]
    assert runner.traced_steps() == traces, "a step retraced instead of using a warm bucket"
    assert np.isfinite(np.asarray(runner.kv.k[0][:, :4])).all()


def test_a_speculating_engine_warms_a_drafts_variant_and_prefills_without_it(hf_checkpoints):
    """With speculation each bucket has a second program for steps carrying drafts (a sampling
    row per draft token): prefill steps take the plain one, drafted steps the other, and
    serving traces nothing after the warm-up."""
    from scheduler.speculation.drafters import NgramDrafter
    path = hf_checkpoints["llama3"]
    eng = Engine(load_hf_model(path), Tokenizer.from_dir(path), CacheConfig(page_size=4, num_pages=32),
                 SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=48),
                 options=EngineOptions(warmup=True, attention_backend="xla"), drafter=NgramDrafter(),
                 max_spec_tokens=4)
    runner = eng.runner
    plain, drafts = {(16, 4, False, False), (32, 4, False, False)}, {(16, 4, False, True), (32, 4, False, True)}
    assert runner.compiled_buckets() == plain | drafts
    assert runner.prepare(_plan_of(list(range(20))))[0] == (32, 4, False, False)  # a prompt: one row
    assert runner.prepare(_plan_of(list(range(8)), num_draft=3))[0] == (16, 4, False, True)
    traces = runner.traced_steps()
    out = eng.generate([[5, 6, 7, 8] * 4], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert len(out[0].token_ids) == 12 and eng.spec_stats().draft_tokens > 0  # (n-gram drafts on the repeats)
    assert runner.traced_steps() == traces, "a step retraced instead of using a warm bucket"


def _plan_of(ids, num_draft=0):
    """A one-sequence plan from position 0 (its last num_draft ids a draft)."""
    from jinfer.step_plan import ScheduledSeq, StepPlan
    seq = ScheduledSeq("p", tuple(ids), 0, tuple(range(len(ids) // 4 + 1)), True, SamplingParams(temperature=0),
                       0, 0, 0, num_draft=num_draft)
    return StepPlan((seq,))


def test_async_engine_dispatches_the_next_step_before_reading_the_last(hf_checkpoints):
    path = hf_checkpoints["llama3"]
    eng = Engine(load_hf_model(path), Tokenizer.from_dir(path), CacheConfig(page_size=4, num_pages=32),
                 SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=48))
    calls = []
    dispatch, fetch = eng.runner.dispatch, eng.runner.fetch
    eng.runner.dispatch = lambda plan: calls.append("dispatch") or dispatch(plan)
    eng.runner.fetch = lambda handle: calls.append("fetch") or fetch(handle)
    eng.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert eng.step() == []  # step 1 is in flight; its token comes with the next call
    assert len(eng.step()) == 1
    assert calls == ["dispatch", "dispatch", "fetch"]  # step 2 was queued before step 1 was read


_CACHE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig
    from jinfer.engine import Engine, enable_compilation_cache
    from jinfer.models.config import preset
    from jinfer.models.llama import init_model
    from jinfer.tokenizer import byte_level_tokenizer

    events = []
    jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
    enable_compilation_cache(sys.argv[1], min_compile_secs=0)
    tok = byte_level_tokenizer()
    import dataclasses
    cfg = dataclasses.replace(preset("tiny"), vocab_size=tok.vocab_size, num_layers=1)
    Engine(init_model(cfg, seed=0), tok, CacheConfig(page_size=4, num_pages=16),
           SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=2, max_model_len=32), options=EngineOptions(warmup=True))
    print(json.dumps({"hits": events.count("/jax/compilation_cache/cache_hits"),
                      "misses": events.count("/jax/compilation_cache/cache_misses")}))
""")


def test_persistent_compilation_cache_serves_a_restart(tmp_path):
    """A second process compiles no step bucket: all come from the on-disk cache."""
    cache = tmp_path / "xla"
    runs = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, str(cache)], capture_output=True,
                             text=True, timeout=300, env=ONE_DEVICE)
        assert res.returncode == 0, res.stderr
        runs.append(json.loads(res.stdout.splitlines()[-1]))
    assert runs[0]["hits"] == 0 and runs[0]["misses"] >= 2  # the two step buckets at least
    assert os.listdir(cache)
    assert runs[1]["hits"] >= 2 and runs[1]["misses"] == 0, runs


def test_buckets_compile_lazily_one_program_per_token_bucket(hf_checkpoints):
    path = hf_checkpoints["llama3"]
    eng = Engine(load_hf_model(path), Tokenizer.from_dir(path), CacheConfig(page_size=4, num_pages=64),
                 SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=64))
    runner = eng.runner
    assert runner.traced_steps() == 0  # nothing compiled up front
    assert [runner.bucket(n) for n in (1, 16, 17, 40, 64)] == [(16, 8), (16, 8), (32, 8), (64, 8), (64, 8)]
    prompts = [list(range(1, 1 + n)) for n in (3, 20, 45, 7, 2, 33, 9, 12, 5)]
    out = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [5] * len(prompts)
    assert 1 <= runner.traced_steps() <= len(runner.token_buckets)  # decodes and mixes alike


@pytest.mark.slow  # ~35 s of child processes; the engine paths it runs are covered in-process
def test_engines_sharing_a_program_store_share_the_programs_they_compile_on_first_use(hf_checkpoints):
    """Without a warm-up, the first engine compiles each bucket it meets into the store; a second
    engine of the model with that store compiles nothing for the same run and emits the same
    tokens."""
    from jinfer.programs import ProgramStore

    path = hf_checkpoints["llama3"]
    model, tok, store = load_hf_model(path), Tokenizer.from_dir(path), ProgramStore()
    engines = [Engine(model, tok, CacheConfig(page_size=4, num_pages=64),
                      SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=64), programs=store)
               for _ in range(2)]
    prompts, params = [[1, 2, 3], list(range(1, 25))], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    first = engines[0].generate(prompts, params)
    compiled = store.compiled
    assert compiled >= 2 and engines[0].runner.traced_steps() == compiled  # a prefill and a decode bucket
    assert not engines[1].runner.compiled_buckets()
    hits = store.hits
    second = engines[1].generate(prompts, params)
    assert [o.token_ids for o in second] == [o.token_ids for o in first]
    assert store.compiled == compiled and store.hits - hits == compiled
    assert engines[1].runner.traced_steps() == 0
    assert engines[1].runner.compiled_buckets() == engines[0].runner.compiled_buckets()


@pytest.mark.slow  # ~50 s alone, 75-100 s in the default run: four child processes and a dozen engines.
# bench_engine runs end to end by default in its --backends mode (the test below); the rollout
# benchmark's smoke is in the slow set for the same reason (tests/test_das.py).
def test_engine_benchmark_smoke_reports_every_measure():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, os.path.join(root, "tools", "bench_engine.py"), "--smoke"],
                         capture_output=True, text=True, timeout=600, env=ONE_DEVICE)
    assert res.returncode == 0, res.stderr[-3000:]
    table, _, breakdown = res.stdout.partition("Where the time goes")
    rows = {line.split("|")[1].strip(): float(line.split("|")[2].replace(",", ""))
            for line in table.splitlines() if line.startswith("| ") and not line.startswith("| measure")}
    assert "| decode steps, 16-token bucket |" in breakdown  # the step-kind breakdown table
    for name in ("start to first token, empty compilation cache", "start to first token, compilation cache warm",
                 "benchmark model: engine / HF generate", "test model: engine / HF generate",
                 "benchmark model: engine / HF generate with sorted batches",
                 "benchmark model: engine process peak resident memory", "bare step time / its matmuls' time",
                 "engine (async) / bare loop, worst of 1", "host overhead per step (sync)", "TTFT off / on"):
        assert name in rows, f"{name!r} missing from the report: {sorted(rows)}"
    assert all(v >= 0 for v in rows.values())
    assert rows["benchmark model: engine process peak resident memory"] > 50  # MiB: a real process
    assert rows["start to first token, empty compilation cache"] > 0


def test_engine_benchmark_backend_comparison_reports_each_backend_and_context():
    """--backends: engine vs bare loop per attention backend and context (a tiny model on CPU;
    on a GPU the same flags measured benchmarks/engine.md's GPU section), each row with the
    engine's steps launched inline and from the launch thread; xla only (the pallas backend's
    engine runs are checked in tests/test_pallas_backend.py)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["--backends=xla", "--launch_thread=false,true", "--preset=tiny", "--decode_batch=2", "--decode_steps=3",
            "--backend_contexts=5,20", "--page_size=4", "--max_num_batched_tokens=16", "--repeats=1"]
    res = subprocess.run([sys.executable, os.path.join(root, "tools", "bench_engine.py"), *args],
                         capture_output=True, text=True, timeout=600, env=ONE_DEVICE)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "random-weight Llama of the tiny shape" in res.stdout, res.stdout
    rates, _, host = res.stdout.partition("The engine's timed steps on the host")
    host, _, probe = host.partition("Pipeline probe")

    def rows(text):
        return [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| xla")]
    want = [("xla", "5"), ("xla", "20"), ("xla+launch-thread", "5"), ("xla+launch-thread", "20")]
    assert [(r[0].strip(), r[1].strip()) for r in rows(rates)] == want, res.stdout
    for r in rows(rates):
        bare, engine, ratio = (float(x.replace(",", "")) for x in r[2:5])
        assert bare > 0 and engine > 0 and ratio == pytest.approx(engine / bare, rel=0.05)
    # Per backend and context, the engine step split on the host: every phase timed, the parts
    # no larger than the step, host work = step less the wait.
    assert [(r[0].strip(), r[1].strip()) for r in rows(host)] == want, res.stdout
    for r in rows(host):
        step, dispatch, wait, post, rest, work, prepare, launch = (float(x) for x in r[3:11])
        assert step > 0 and dispatch > 0 and post > 0 and wait >= 0 and rest >= 0, r
        assert max(dispatch, wait, post, work) <= step + 0.01, r
        assert 0 < prepare <= dispatch and launch >= 0, r  # dispatch = prepare + launch
    # The pipeline probe: the bare loop per step, plain, with the engine's late read-back (two
    # ways), and with its host work spent while the next step runs, so never shorter than it.
    assert [(r[0].strip(), r[1].strip()) for r in rows(probe)] == want, res.stdout
    for r, h in zip(rows(probe), rows(host)):
        bare, late, launch, with_work, work = (float(x) for x in r[2:7])
        assert min(bare, late, launch) > 0 and work == float(h[8]), (r, h)
        assert with_work >= work - 0.01, r
    parts = re.search(r"attention off \(K/V still written\) ([\d.]+) ms; .* alone \(plain jnp, same shapes\) "
                      r"([\d.]+) ms", res.stdout)
    assert parts and float(parts[1]) > 0 and float(parts[2]) > 0, res.stdout


def test_min_token_bucket_one_pads_a_lone_decode_to_one_token_with_the_same_tokens(hf_checkpoints):
    path = hf_checkpoints["llama3"]
    sched = SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=48)
    prompts = [[1, 2, 3], list(range(5, 25))]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = {}
    for smallest in (16, 1):
        eng = Engine(load_hf_model(path), Tokenizer.from_dir(path), CacheConfig(page_size=4, num_pages=32), sched,
                     options=EngineOptions(min_token_bucket=smallest))
        assert eng.runner.token_buckets[0] == smallest
        assert eng.runner.bucket(1) == (smallest, min(smallest, 4))
        outs[smallest] = [o.token_ids for o in eng.generate(prompts, params)]
    assert outs[1] == outs[16]
    with pytest.raises(ValueError, match="min_token_bucket=3 must be a power of two"):
        EngineOptions(min_token_bucket=3)


def test_background_warmup_waits_for_the_server_to_listen(hf_checkpoints):
    """The other buckets of a background warm-up wait until the server listens (or the first
    step), so a server's set-up does not share the CPU with compiling them."""
    from jinfer.config import ServingConfig
    from jinfer.serving.server import Server

    path = hf_checkpoints["llama3"]
    eng = Engine(load_hf_model(path), Tokenizer.from_dir(path), CacheConfig(page_size=4, num_pages=64),
                 SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=96),
                 options=EngineOptions(warmup=True, warmup_background=True))
    assert eng.runner.compiled_buckets() == {(16, 4, False, False)} and not eng.runner.wait_warmup(0)  # held
    srv = Server(eng, ServingConfig(metrics_port=0))
    warming = lambda: srv.metrics.registry.get_sample_value("jinfer_warmup_in_progress")  # noqa: E731
    assert eng.warming_up() and warming() == 1.0  # what tools/demo.py waits on before its replay
    srv.start()
    try:
        assert eng.runner.wait_warmup(120)
        assert eng.runner.compiled_buckets() == {(16, 4, False, False), (32, 4, False, False), (64, 4, False, False)}
        assert not eng.warming_up() and warming() == 0.0
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as r:
            assert "jinfer_warmup_in_progress 0.0" in r.read().decode().splitlines()
    finally:
        srv.stop(grace=0)


def test_background_warmup_serves_within_compiled_buckets_until_the_rest_compile(hf_checkpoints):
    """warmup_background: the smallest bucket compiles before the engine returns; while a larger
    one is still compiling (held here by an event), steps stay within the compiled buckets (a
    long prompt is prefilled in chunks) and nothing compiles on the serving path; the tokens
    equal a fully warmed engine's."""
    import threading

    path = hf_checkpoints["llama3"]
    sched = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=96)
    prompts = [list(range(1, 41)), [3, 4, 5]]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    want = [o.token_ids for o in Engine(load_hf_model(path), Tokenizer.from_dir(path),
                                        CacheConfig(page_size=4, num_pages=64), sched,
                                        options=EngineOptions(warmup=True)).generate(prompts, params)]
    from jinfer.programs import ProgramStore

    release = threading.Event()

    class Held(ProgramStore):  # holds the compiles of buckets above 16 tokens until released
        def get_or_compile(self, key, compile_fn):
            if key.bucket[0] > 16:
                assert release.wait(120), "the test never released the background compile"
            return super().get_or_compile(key, compile_fn)

    try:
        # With the launch thread: the background compiles read the pool's shapes while launches
        # are under way there, and must neither wait for them nor take their outputs.
        eng = Engine(load_hf_model(path), Tokenizer.from_dir(path), CacheConfig(page_size=4, num_pages=64), sched,
                     options=EngineOptions(warmup=True, warmup_background=True, launch_thread=True), programs=Held())
        runner = eng.runner
        assert runner.compiled_buckets() == {(16, 4, False, False)} and runner.ready_tokens() == 16
        sizes = []
        dispatch = runner.dispatch
        runner.dispatch = lambda plan: sizes.append(plan.num_tokens) or dispatch(plan)
        ids = [eng.add_request(p, params) for p in prompts]
        outs = []
        while len(outs) < 2 and max(sizes, default=0) <= 16 and len(sizes) < 12:
            outs += [o for o in eng.step() if o.finished]
        assert max(sizes) <= 16 and sizes[0] == 16  # the 40-token prompt went in 16-token chunks
        assert runner.traced_steps() == 0  # no step compiled on the serving path
        release.set()
        assert eng.runner.wait_warmup(120)
        assert runner.compiled_buckets() == {(16, 4, False, False), (32, 4, False, False), (64, 4, False, False)}
        for _ in range(50):
            if len(outs) == 2:
                break
            outs += [o for o in eng.step() if o.finished]
        eng.generate([list(range(100, 150))], params)  # no prefix hit: 50 new tokens in one step
        assert runner.ready_tokens() == 64 and eng.scheduler.token_limit is None and max(sizes) > 16
    finally:
        release.set()
    assert [o.token_ids for o in sorted(outs, key=lambda o: ids.index(o.request_id))] == want
