"""Engine: greedy parity with HF, invariance to caching/chunking/preemption/arrival, API errors."""

import concurrent.futures
import dataclasses

import numpy as np
import pytest
import torch
import transformers

from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.sampling_params import SamplingParams
from jinfer.step_plan import ScheduledSeq, StepPlan
from jinfer.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(hf_checkpoints):
    path = hf_checkpoints["llama3"]
    return path, load_hf_model(path), Tokenizer.from_dir(path)


def _engine(llama, *, page_size=4, num_pages=96, budget=64, max_seqs=8, prefix=True, pipelined=True):
    _, model, tok = llama
    return Engine(model, tok, CacheConfig(page_size=page_size, num_pages=num_pages,
                                          enable_prefix_cache=prefix),
                  SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=96),
                  options=EngineOptions(async_scheduling=pipelined))


def _prompts(seed=0, lengths=(9, 3, 17, 30, 5)):
    rng = np.random.default_rng(seed)
    shared = rng.integers(0, 256, 12).tolist()  # a common prefix for some, to exercise sharing
    out = []
    for i, n in enumerate(lengths):
        tail = rng.integers(0, 256, n).tolist()
        out.append(shared + tail if i % 2 else tail)
    return out


@pytest.fixture(scope="module")
def reference(llama):
    """HF greedy continuations of _prompts(), one sequence at a time."""
    path = llama[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    out = []
    for p in _prompts():
        with torch.no_grad():
            ids = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


def _tokens(outputs):
    return [o.token_ids for o in outputs]


# The invariance cases below compare the same prompts to the same HF reference at budgets 8, 32
# and 128 with the prefix cache on and off; this one (budget 64) is in the slow set.
@pytest.mark.slow
def test_greedy_matches_hf_generate_on_ragged_batch(llama, reference):
    assert _tokens(_engine(llama).generate(_prompts(), GREEDY)) == reference


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("budget", [8, 32, 128])
def test_greedy_invariant_to_prefix_cache_and_chunk_size(llama, reference, prefix, budget):
    eng = _engine(llama, budget=budget, prefix=prefix)
    assert _tokens(eng.generate(_prompts(), GREEDY)) == reference
    # Run again: with the prefix cache on, the prompts now hit cached pages.
    again = eng.generate(_prompts(), GREEDY)
    assert _tokens(again) == reference
    cached = sum(o.usage.cached_prompt_tokens for o in again)
    assert (cached > 0) == prefix


@pytest.mark.parametrize("pipelined", [True, False])
def test_greedy_invariant_to_forced_preemption(llama, reference, pipelined):
    # 20 pages of 4 tokens cannot hold all five requests at once: some are preempted and recomputed.
    eng = _engine(llama, num_pages=20, budget=32, pipelined=pipelined)
    preempted = []
    orig = eng.scheduler.preempt
    eng.scheduler.preempt = lambda req: (preempted.append(req.request_id), orig(req))
    assert _tokens(eng.generate(_prompts(), GREEDY)) == reference
    assert preempted, "the pool was meant to be too small to avoid preemption"


def test_greedy_invariant_to_mid_run_arrivals(llama, reference):
    eng = _engine(llama, budget=16)
    prompts = _prompts()
    ids = {}
    finals = {}
    for i, p in enumerate(prompts):
        ids[eng.add_request(p, GREEDY)] = i
        for _ in range(3):  # some steps between arrivals
            for o in eng.step():
                if o.finished:
                    finals[ids[o.request_id]] = o.token_ids
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                finals[ids[o.request_id]] = o.token_ids
    assert [finals[i] for i in range(len(prompts))] == reference


def test_outputs_stream_deltas_and_usage(llama):
    eng = _engine(llama)
    rid = eng.add_request("def f(x):", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                       logprobs=True))
    deltas, last = [], None
    while eng.has_unfinished():
        for o in eng.step():
            deltas.append(o.new_token_ids)
            last = o
    assert last.request_id == rid and last.finished and last.finish_reason == "length"
    assert sum(deltas, []) == last.token_ids and len(last.token_ids) == 5
    assert last.usage.prompt_tokens == len("def f(x):") + 1  # + BOS
    assert len(last.new_logprobs) == 1 and last.new_logprobs[0] <= 0
    assert last.first_token_time >= last.arrival_time and last.finish_time >= last.first_token_time


def test_abort_frees_pages(llama):
    eng = _engine(llama, prefix=False)
    free0 = eng.scheduler.pool.num_free
    rid = eng.add_request(list(range(40)), GREEDY)
    eng.step()
    assert eng.scheduler.pool.num_free < free0
    assert eng.abort(rid) and not eng.abort(rid)
    assert eng.scheduler.pool.num_free == free0 and not eng.has_unfinished()


@pytest.mark.parametrize("prompt, params, message", [
    ("", None, "prompt is empty"),
    ([1, 999], None, r"prompt token ids \[999\] are outside the vocabulary \[0, 300\)"),
    ([1] * 90, SamplingParams(max_tokens=10), r"prompt \(90 tokens\) \+ max_tokens \(10\) exceeds max_model_len=96"),
])
def test_add_request_rejects_bad_input(llama, prompt, params, message):
    eng = _engine(llama)
    with pytest.raises(ValueError, match=message):
        eng.add_request(prompt, params)
    assert not eng.has_unfinished()


def test_duplicate_request_id_is_rejected(llama):
    eng = _engine(llama)
    eng.add_request([1, 2], GREEDY, request_id="a")
    with pytest.raises(ValueError, match="request_id='a' is already in use"):
        eng.add_request([3], GREEDY, request_id="a")


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.5, "temperature=-0.5 must be finite and >= 0"),
    ("temperature", float("inf"), "temperature=inf must be finite and >= 0"),
    ("temperature", float("nan"), "temperature=nan must be finite and >= 0"),
    ("top_p", 0.0, r"top_p=0.0 must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p=1.5 must be in \(0, 1\]"),
    ("top_k", -1, "top_k=-1 must be >= 0"),
    ("min_p", 2.0, r"min_p=2.0 must be in \[0, 1\]"),
    ("max_tokens", 0, "max_tokens=0 must be > 0"),
    ("seed", -3, r"seed=-3 must be in \[0, 2\*\*31\)"),
    ("stop", ("a", ""), r"stop\[1\] is an empty string"),
    ("n", 0, "n=0 must be > 0"),
])
def test_sampling_params_name_the_bad_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


SAMPLED = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=10, ignore_eos=True, seed=7)


def test_async_scheduling_changes_no_token(llama):
    """Sampled, stopped early and preempted requests: the pipelined engine matches the plain one."""
    params = [SAMPLED, GREEDY, SamplingParams(temperature=0.8, seed=3, max_tokens=12, stop_token_ids=(5, 77)),
              dataclasses.replace(SAMPLED, seed=11), GREEDY]
    runs = [_engine(llama, num_pages=20, budget=32, pipelined=p).generate(_prompts(), params)
            for p in (True, False)]
    assert _tokens(runs[0]) == _tokens(runs[1])
    assert [o.finish_reason for o in runs[0]] == [o.finish_reason for o in runs[1]]


def test_launch_thread_changes_no_token(llama):
    """Steps launched from the worker thread: sampled, stopped and preempted requests as with
    launches inline, pipelined or not; the pool's K/V and the fed-back ids are the launch's."""
    params = [SAMPLED, GREEDY, SamplingParams(temperature=0.8, seed=3, max_tokens=12, stop_token_ids=(5, 77)),
              dataclasses.replace(SAMPLED, seed=11), GREEDY]
    want = _engine(llama, num_pages=20, budget=32).generate(_prompts(), params)
    for pipelined in (True, False):
        eng = _engine(llama, num_pages=20, budget=32, pipelined=pipelined)
        eng.runner._launches = concurrent.futures.ThreadPoolExecutor(1)  # as EngineOptions(launch_thread=True)
        preempted, orig = [], eng.scheduler.preempt
        eng.scheduler.preempt = lambda req: (preempted.append(req.request_id), orig(req))
        got = eng.generate(_prompts(), params)
        assert _tokens(got) == _tokens(want) and preempted
        assert [o.finish_reason for o in got] == [o.finish_reason for o in want]


def test_launch_thread_surfaces_a_failed_launch_and_reset_forgets_it(llama, reference):
    """A launch that fails in the launch thread raises where its outputs are read (the step's
    fetch, or the pool) and only there; the arrays stay those before it; Engine.reset drops a
    failed launch still under way, and the engine serves again."""
    eng = Engine(*llama[1:], CacheConfig(page_size=4, num_pages=40),
                 SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=96),
                 options=EngineOptions(launch_thread=True))
    runner, before = eng.runner, eng.runner.kv
    plan = StepPlan((ScheduledSeq("x", (1, 2, 3), 0, (0,), True, GREEDY, 0, 0, 0),))

    def broken(*args):
        raise RuntimeError("launch failed")
    runner._launch = broken
    handle = runner.dispatch(plan)
    with pytest.raises(RuntimeError, match="launch failed"):
        runner.fetch(handle)
    assert runner.kv is before  # read again: the failure was taken once, the pool is the old one
    runner.dispatch(plan)
    with pytest.raises(RuntimeError, match="launch failed"):
        runner.kv
    runner.dispatch(plan)
    eng.reset()  # drops the failed launch under way without raising
    del runner._launch  # the class's again
    assert [o.token_ids for o in eng.generate([_prompts()[0]], GREEDY)] == [reference[0]]


def test_n_samples_share_the_prompt_pages(llama, reference):
    eng = _engine(llama, prefix=False)
    prompt = _prompts()[3]  # 42 tokens: 10 full pages of 4 are shared, the tail is per sample
    rid = eng.add_request(prompt, dataclasses.replace(GREEDY, n=3))
    for _ in range(4):
        eng.step()
    samples = eng.samples(rid)
    shared = samples[0].pages[:10]
    assert all(s.pages[:10] == shared for s in samples)
    assert len({p for s in samples for p in s.pages[10:]}) == sum(len(s.pages) - 10 for s in samples)
    assert all(eng.scheduler.pool.refcount(p) == 3 for p in shared)
    outs = []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.finished]
    assert sorted(o.index for o in outs) == [0, 1, 2]
    assert all(o.request_id == rid and o.token_ids == reference[3] for o in outs)  # greedy: all equal HF
    assert {o.usage.cached_prompt_tokens for o in outs} == {0, 40}
    assert eng.scheduler.pool.num_free == eng.runner.num_pages


def test_n_samples_are_independent_and_seeded(llama):
    eng = _engine(llama)
    outs = eng.generate([_prompts()[1]], dataclasses.replace(SAMPLED, n=4))
    assert [o.index for o in outs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in outs}) == 4
    # The first sample is the n=1 request with the same seed; the others are new streams.
    single = eng.generate([_prompts()[1]], SAMPLED)[0]
    assert outs[0].token_ids == single.token_ids
    again = eng.generate([_prompts()[1]], dataclasses.replace(SAMPLED, n=4))
    assert _tokens(again) == _tokens(outs)


def test_abort_stops_every_sample(llama):
    eng = _engine(llama, prefix=False)
    rid = eng.add_request(_prompts()[3], dataclasses.replace(GREEDY, n=3))
    for _ in range(3):
        eng.step()
    assert eng.abort(rid) and not eng.has_unfinished()
    eng.step()  # reads back the step in flight; nothing is emitted for aborted samples
    assert eng.scheduler.pool.num_free == eng.runner.num_pages
