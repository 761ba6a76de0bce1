"""Speculative decoding in the engine: drafts verified in the step emit exactly the tokens plain
decoding emits (greedy and seeded sampling), under prefix caching, chunking, preemption and n
samples; the drafter hears every request's tokens and its end; pages come back."""

import random

import numpy as np
import pytest

from jinfer import DEFAULT_MODEL_DIR
from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig
from jinfer.engine import Engine, enable_compilation_cache
from jinfer.loader.hf import load_hf_model
from jinfer.sampling_params import SamplingParams
from jinfer.speculation import NO_DRAFT, Draft
from jinfer.tokenizer import Tokenizer

PROMPTS = ["def fibonacci(n):", "import os\n", "class A:", "hello world", "for i in range(10):"]


class OracleDrafter:
    """Proposes the reference continuation of each request (its plain-decoding output), with a
    fraction of the tokens replaced by wrong ones; records what the engine tells it."""

    def __init__(self, reference: dict[str, list[int]], wrong: float = 0.25, seed: int = 0):
        self.reference, self.wrong, self.rng = reference, wrong, random.Random(seed)
        self.started, self.observed, self.finished = {}, {}, {}

    def start(self, request_id, prompt_ids):
        assert request_id not in self.started
        self.started[request_id] = list(prompt_ids)
        self.observed[request_id] = []

    def propose(self, request_id, output_ids, max_tokens):
        assert 0 < max_tokens and list(output_ids) == self.observed[request_id]
        nxt = self.reference.get(request_id, [])[len(output_ids):len(output_ids) + max_tokens]
        toks = [t if self.rng.random() >= self.wrong else (t + 1) % 4096 for t in nxt]
        return Draft.chain(toks) if toks else NO_DRAFT

    def observe(self, request_id, new_tokens):
        self.observed[request_id] += list(new_tokens)

    def finish(self, request_id, output_ids, aborted):
        assert request_id not in self.finished
        self.finished[request_id] = (list(output_ids), aborted)


class TreeOracleDrafter(OracleDrafter):
    """Tree drafts: at random points the right token is the second of two children (so the
    accepted path leaves the leading chain and its K/V must move into place)."""

    def propose(self, request_id, output_ids, max_tokens):
        assert list(output_ids) == self.observed[request_id]
        tokens, parents, node = [], [], -1
        for t in self.reference.get(request_id, [])[len(output_ids):len(output_ids) + max_tokens]:
            if len(tokens) + 2 > max_tokens:
                break
            if self.rng.random() < 0.4:
                tokens += [(t + 7) % 4096, t]
                parents += [node, node]
            else:
                tokens.append(t if self.rng.random() >= self.wrong else (t + 1) % 4096)
                parents.append(node)
            node = len(tokens) - 1
        return Draft(tuple(tokens), tuple(parents)) if tokens else NO_DRAFT


DRAFTERS = {"chain": OracleDrafter, "tree": TreeOracleDrafter}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # The engines here compile the same step programs over and over: keep them on disk.
    enable_compilation_cache(str(tmp_path_factory.mktemp("xla-cache")))
    return load_hf_model(DEFAULT_MODEL_DIR), Tokenizer.from_dir(DEFAULT_MODEL_DIR)


def _engine(model, drafter=None, *, prefix=True, budget=64, num_pages=128, max_spec=6, pipelined=True):
    m, tok = model
    return Engine(m, tok, CacheConfig(page_size=16, num_pages=num_pages, enable_prefix_cache=prefix),
                  SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=256),
                  options=EngineOptions(async_scheduling=pipelined), drafter=drafter, max_spec_tokens=max_spec)


def _run(engine, prompts, params):
    """Final outputs keyed (request id, sample index), and the number of steps taken."""
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=f"r{i}")
    outs, steps = {}, 0
    while engine.has_unfinished():
        steps += 1
        for out in engine.step():
            if out.finished:
                outs[(out.request_id, out.index)] = out
    return outs, steps


def _reference(model, params, **kw):
    outs, steps = _run(_engine(model, **kw), PROMPTS, params)
    ref = {(f"{rid}/{k}" if k else rid): list(o.token_ids) for (rid, k), o in outs.items()}
    return outs, steps, ref


GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=40, ignore_eos=True, n=2, logprobs=True)


@pytest.mark.parametrize("kind", list(DRAFTERS))
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("prefix, budget, num_pages", [(True, 64, 128), (False, 16, 128), (True, 64, 14)],
                         ids=["prefix", "small-budget", "preempting"])
def test_speculation_emits_the_tokens_plain_decoding_does(model, kind, params, prefix, budget, num_pages):
    want, plain_steps, ref = _reference(model, params, prefix=prefix, budget=budget, num_pages=num_pages)
    drafter = DRAFTERS[kind](ref)
    engine = _engine(model, drafter, prefix=prefix, budget=budget, num_pages=num_pages)
    got, steps = _run(engine, PROMPTS, params)
    assert {k: o.token_ids for k, o in got.items()} == {k: o.token_ids for k, o in want.items()}
    assert {k: o.text for k, o in got.items()} == {k: o.text for k, o in want.items()}
    assert steps < plain_steps
    load = engine.load()
    assert load.free_pages + load.cached_pages == load.num_pages
    # The drafter heard every request (each sample) from its start to its end.
    assert set(drafter.finished) == set(ref) == set(drafter.started)
    for rid, (output, aborted) in drafter.finished.items():
        assert not aborted and output == ref[rid] == drafter.observed[rid]


@pytest.mark.parametrize("kind", list(DRAFTERS))
def test_logprobs_match_plain_decoding(model, kind):
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=24, ignore_eos=True, logprobs=True)
    plain = _engine(model)
    plain.add_request(PROMPTS[0], params, request_id="r0")
    final = {}
    while plain.has_unfinished():
        for out in plain.step():
            final[out.request_id] = out
    ref = {"r0": list(final["r0"].token_ids)}
    engine = _engine(model, DRAFTERS[kind](ref, wrong=0.3))
    engine.add_request(PROMPTS[0], params, request_id="r0")
    chunks = []
    while engine.has_unfinished():
        chunks += engine.step()
    assert any(len(c.new_token_ids) > 1 for c in chunks)  # drafts were accepted
    got_lp = [lp for c in chunks for lp in c.new_logprobs]
    want_lp = []  # plain decoding's logprobs, one token per step
    plain = _engine(model)
    plain.add_request(PROMPTS[0], params, request_id="r0")
    while plain.has_unfinished():
        want_lp += [lp for c in plain.step() for lp in c.new_logprobs]
    np.testing.assert_allclose(got_lp, want_lp, rtol=1e-4, atol=1e-5)


def test_a_speculating_engine_runs_synchronously_and_stops_mid_draft(model):
    params = SamplingParams(temperature=0, max_tokens=60, stop=("\n\n",))
    want, _, ref = _reference(model, params)
    engine = _engine(model, OracleDrafter(ref, wrong=0.0), pipelined=True)
    assert not engine.async_scheduling
    got, _ = _run(engine, PROMPTS, params)
    assert {k: (o.token_ids, o.text, o.finish_reason) for k, o in got.items()} == {
        k: (o.token_ids, o.text, o.finish_reason) for k, o in want.items()}


def test_abort_mid_speculation_tells_the_drafter_and_frees_pages(model):
    _, _, ref = _reference(model, GREEDY)
    drafter = OracleDrafter(ref, wrong=0.0)
    engine = _engine(model, drafter)
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, GREEDY, request_id=f"r{i}")
    for _ in range(4):
        engine.step()
    assert engine.abort("r1")
    while engine.has_unfinished():
        engine.step()
    assert drafter.finished["r1"][1] is True
    load = engine.load()
    assert load.free_pages + load.cached_pages == load.num_pages


def test_requests_can_opt_out_and_drafts_respect_the_budget(model):
    _, _, ref = _reference(model, GREEDY)

    class Greedy(OracleDrafter):
        def propose(self, request_id, output_ids, max_tokens):
            assert max_tokens <= 3
            return super().propose(request_id, output_ids, max_tokens)

    drafter = Greedy(ref, wrong=0.0)
    engine = _engine(model, drafter, max_spec=3)
    engine.add_request(PROMPTS[0], GREEDY, request_id="r0")
    engine.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, speculate=False),
                       request_id="r1")
    final = {}
    while engine.has_unfinished():
        final.update({o.request_id: o for o in engine.step()})
    assert [final[r].token_ids for r in ("r0", "r1")] == [ref["r0"], ref["r1"]]
    u0, u1 = final["r0"].usage, final["r1"].usage
    assert u1.draft_tokens == u1.accepted_draft_tokens == u1.spec_steps == 0
    # An always-right drafter of 3 tokens: 4 tokens per verifying step, all drafts accepted.
    assert u0.draft_tokens == u0.accepted_draft_tokens > 0 and u0.draft_tokens <= 3 * u0.spec_steps
    assert u0.spec_steps < 40 / 3
