"""Speculative decoding in the engine: drafts verified in the step emit exactly the tokens plain
decoding emits (greedy and seeded sampling), under prefix caching, chunking, preemption and n
samples; the drafter hears every request's tokens and its end; pages come back."""

import dataclasses
import math
import random

import numpy as np
import pytest

from entrypoints.build import build_drafter
from jinfer import TEST_MODEL_DIR
from jinfer.attention import AttentionMetadata
from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig, SpeculationConfig
from jinfer.engine import Engine
from jinfer.kv_cache import KVCache
from jinfer.loader.hf import load_hf_model
from jinfer.programs import ProgramStore
from jinfer.sampling_params import SamplingParams
from jinfer.speculation import NO_DRAFT, Draft, verify
from jinfer.tokenizer import Tokenizer
from tests.model_forward import jit_forward

SHARED = "import os\nimport sys\nimport json\nimport time\nimport random\nimport collections\n"
# Two prompts share a prefix of full pages: the prefix cache serves the second.
PROMPTS = ["def fibonacci(n):", SHARED + "def main():", "class A:", "hello world", SHARED + "class Config:"]


class OracleDrafter:
    """Proposes the reference continuation of each request (its plain-decoding output), with a
    fraction of the tokens replaced by wrong ones; records what the engine tells it."""

    def __init__(self, reference: dict[str, list[int]], wrong: float = 0.25, seed: int = 0, vocab: int = 4096):
        self.reference, self.wrong, self.rng, self.vocab = reference, wrong, random.Random(seed), vocab
        self.started, self.observed, self.finished = {}, {}, {}

    def start(self, request_id, prompt_ids):
        assert request_id not in self.started
        self.started[request_id] = list(prompt_ids)
        self.observed[request_id] = []

    def propose(self, request_id, output_ids, max_draft_tokens):
        assert 0 < max_draft_tokens and list(output_ids) == self.observed[request_id]
        nxt = self.reference.get(request_id, [])[len(output_ids):len(output_ids) + max_draft_tokens]
        toks = [t if self.rng.random() >= self.wrong else (t + 1) % self.vocab for t in nxt]
        return Draft.chain(toks) if toks else NO_DRAFT

    def observe(self, request_id, new_tokens):
        self.observed[request_id] += list(new_tokens)

    def finish(self, request_id, output_ids, aborted):
        assert request_id not in self.finished
        self.finished[request_id] = (list(output_ids), aborted)


class TreeOracleDrafter(OracleDrafter):
    """Tree drafts: at random points the right token is the second of two children (so the
    accepted path leaves the leading chain and its K/V must move into place)."""

    def propose(self, request_id, output_ids, max_draft_tokens):
        assert list(output_ids) == self.observed[request_id]
        tokens, parents, node = [], [], -1
        for t in self.reference.get(request_id, [])[len(output_ids):len(output_ids) + max_draft_tokens]:
            if len(tokens) + 2 > max_draft_tokens:
                break
            if self.rng.random() < 0.4:
                tokens += [(t + 7) % self.vocab, t]
                parents += [node, node]
            else:
                tokens.append(t if self.rng.random() >= self.wrong else (t + 1) % self.vocab)
                parents.append(node)
            node = len(tokens) - 1
        return Draft(tuple(tokens), tuple(parents)) if tokens else NO_DRAFT


DRAFTERS = {"chain": OracleDrafter, "tree": TreeOracleDrafter}


# The test model's compiled step programs, shared by the engines this file (and the speculation
# files importing _engine) build: each would otherwise compile (or read from the persistent
# cache) every bucket it meets, and a speculating engine has two programs per bucket.
PROGRAMS = ProgramStore()


@pytest.fixture(scope="module")
def model():
    return load_hf_model(TEST_MODEL_DIR), Tokenizer.from_dir(TEST_MODEL_DIR)


def _engine(model, drafter=None, *, prefix=True, budget=64, num_pages=128, max_spec=6, pipelined=True,
            launch_thread=False, in_flight=True):
    m, tok = model
    options = EngineOptions(async_scheduling=pipelined, launch_thread=launch_thread, drafts_in_flight=in_flight)
    return Engine(m, tok, CacheConfig(page_size=16, num_pages=num_pages, enable_prefix_cache=prefix),
                  SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=256),
                  options=options, drafter=drafter, max_spec_tokens=max_spec, programs=PROGRAMS)


def _run(engine, prompts, params):
    """Final outputs keyed (request id, sample index), and the number of steps taken. The last
    prompt arrives after three steps (so a prefix it shares is cached by then)."""
    for i, p in enumerate(prompts[:-1]):
        engine.add_request(p, params, request_id=f"r{i}")
    outs, steps = {}, 0
    while engine.has_unfinished() or steps < 3:
        if steps == 3:
            engine.add_request(prompts[-1], params, request_id=f"r{len(prompts) - 1}")
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


def _cases():
    """Every drafter x sampling x (prefix cache, small budget, preemption); the default run
    keeps two that between them cover each drafter, sampling and setup but the prefix cache
    (greedy chains with the prefix cache run in test_real_drafters_keep_the_tokens_and_save_steps,
    sampled trees in test_sampled_tokens_follow_the_model_distribution), the rest are in the
    slow set."""
    fast = {("chain", "sampled", "small-budget"), ("tree", "greedy", "preempting")}
    for kind in DRAFTERS:
        for pname, params in (("greedy", GREEDY), ("sampled", SAMPLED)):
            for name, setup in (("prefix", (True, 64, 128)), ("small-budget", (False, 16, 128)),
                                ("preempting", (True, 64, 10))):
                marks = () if (kind, pname, name) in fast else (pytest.mark.slow,)
                yield pytest.param(kind, params, *setup, id=f"{name}-{pname}-{kind}", marks=marks)


@pytest.mark.parametrize("kind, params, prefix, budget, num_pages", list(_cases()))
def test_speculation_emits_the_tokens_plain_decoding_does(model, kind, params, prefix, budget, num_pages):
    want, plain_steps, ref = _reference(model, params, prefix=prefix, budget=budget, num_pages=num_pages)
    drafter = DRAFTERS[kind](ref)
    # The preempting cases launch their steps from the launch thread (a tree's K/V moves and
    # preemptions read the pool while a launch may be under way there).
    engine = _engine(model, drafter, prefix=prefix, budget=budget, num_pages=num_pages, launch_thread=num_pages < 64)
    preempt, preemptions = engine.scheduler.preempt, []
    engine.scheduler.preempt = lambda req: preemptions.append(req.request_id) or preempt(req)
    got, steps = _run(engine, PROMPTS, params)
    assert bool(preemptions) == (num_pages < 64)  # the small pool does preempt
    assert (got[("r4", 0)].usage.cached_prompt_tokens > 0) == prefix  # a prefix-cache hit
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


def test_drafts_past_a_stop_are_dropped(model):
    """Drafts run past a stop string and an EOS-like stop id: the output ends where plain
    decoding's does, and the drafted tokens past it are dropped."""
    unstopped = SamplingParams(temperature=0, max_tokens=60)
    _, _, ref = _reference(model, unstopped)  # drafts know the text past the stops
    stop_id = ref["r2"][5]
    params = SamplingParams(temperature=0, max_tokens=60, stop=("\n\n",), stop_token_ids=(stop_id,))
    want, _ = _run(_engine(model), PROMPTS, params)
    engine = _engine(model, OracleDrafter(ref, wrong=0.0), pipelined=True)
    got, _ = _run(engine, PROMPTS, params)
    assert {k: (o.token_ids, o.text, o.finish_reason) for k, o in got.items()} == {
        k: (o.token_ids, o.text, o.finish_reason) for k, o in want.items()}
    assert sum(o.finish_reason == "stop" for o in got.values()) >= 2
    assert all(o.usage.accepted_draft_tokens <= len(o.token_ids) for o in got.values())


def test_abort_between_speculating_steps_tells_the_drafter_and_frees_pages(model):
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
        def propose(self, request_id, output_ids, max_draft_tokens):
            # 3 draft tokens, or with a step in flight also that step's draft (<= 3) and sample
            assert max_draft_tokens <= 3 + 3 + 1
            return super().propose(request_id, output_ids, max_draft_tokens)

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


# -- the real drafters, other backends and layouts, and the sampled distribution ---------------


@pytest.mark.parametrize("method, tree", [pytest.param("ngram", False, marks=pytest.mark.slow), ("suffix", False),
                                           ("suffix", True)], ids=["ngram", "suffix-chain", "suffix-tree"])
def test_real_drafters_keep_the_tokens_and_save_steps(model, method, tree):
    """Each prompt twice (as repeated generations are): the suffix drafter drafts the second
    from the first's output, the n-gram one from the request's own repeats."""
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    prompts = PROMPTS[:3] * 2
    want, plain_steps = _run(_engine(model), prompts, params)
    engine = _engine(model, build_drafter(SpeculationConfig(method=method, tree=tree)))
    got, steps = _run(engine, prompts[:3], params)
    more, more_steps = _run(engine, prompts[3:], params)  # ids r0..r2 again, after the first ones ended
    got.update({(f"r{int(rid[1:]) + 3}", k): o for (rid, k), o in more.items()})
    assert {k: o.token_ids for k, o in got.items()} == {k: o.token_ids for k, o in want.items()}
    stats = engine.spec_stats()
    assert stats.accepted_tokens > 0 and steps + more_steps < plain_steps * 2
    load = engine.load()
    assert load.free_pages + load.cached_pages == load.num_pages


@pytest.mark.multi_device
@pytest.mark.slow  # the Pallas tree step vs its reference (one device) and vs XLA (tp=2, 4): test_pallas_*
def test_tree_drafts_on_the_pallas_backend_and_under_tensor_parallelism(model):
    """The interpreted Pallas kernel and a tp=2 mesh (fake devices) verify tree drafts to the
    same tokens as plain decoding on one device."""
    from sharding.tp import make_mesh

    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want, _, ref = _reference(model, params)
    m, tok = model
    for options, mesh in [(EngineOptions(attention_backend="pallas"), None), (EngineOptions(), make_mesh(2))]:
        engine = Engine(m, tok, CacheConfig(page_size=16, num_pages=64),
                        SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256),
                        options=options, mesh=mesh, drafter=TreeOracleDrafter(ref), max_spec_tokens=6, programs=PROGRAMS)
        got, _ = _run(engine, PROMPTS[:2], params)
        assert {k: o.token_ids for k, o in got.items()} == {k: want[k].token_ids for k in got}
        assert engine.spec_stats().accepted_tokens > 0


class RandomDrafter:
    """Random chains or trees over a tiny vocabulary: most drafts are rejected, many accepted
    by chance, so verification's rejection path is exercised at every position."""

    def __init__(self, vocab: int, tree: bool, seed: int = 0):
        self.vocab, self.tree, self.rng = vocab, tree, random.Random(seed)

    def start(self, request_id, prompt_ids):
        pass

    def propose(self, request_id, output_ids, max_draft_tokens):
        k = self.rng.randint(1, max_draft_tokens)
        tokens = tuple(self.rng.randrange(self.vocab) for _ in range(k))
        if not self.tree:
            return Draft.chain(tokens)
        return Draft(tokens, tuple(self.rng.randint(-1, i - 1) for i in range(k)))

    def observe(self, request_id, new_tokens):
        pass

    def finish(self, request_id, output_ids, aborted):
        pass


def _chi2_sf(x: float, df: int) -> float:
    """P(chi-square with df degrees of freedom > x): 1 - the regularized lower gamma (series)."""
    a, t = df / 2, x / 2
    term = total = 1.0 / a
    for n in range(1, 500):
        term *= t / (a + n)
        total += term
    return max(0.0, 1.0 - math.exp(-t + a * math.log(t) - math.lgamma(a)) * total) if t > 0 else 1.0


def _next_token_probs(model, fwd, ids, temperature: float) -> np.ndarray:
    """The model's distribution of the token after `ids` at `temperature` (float64), from one
    forward pass of the model alone (fwd = jit_forward(model); no engine, no sampler)."""
    n, page_size = len(ids), 8
    pages = -(-n // page_size)
    md = AttentionMetadata(np.array([0, n], np.int32), np.array([n], np.int32),
                           np.arange(pages, dtype=np.int32)[None], np.array([1], np.int32), False, None)
    kv = KVCache.create(model.config, pages, page_size)
    logits, _ = fwd(np.array(ids, np.int32), np.arange(n, dtype=np.int32), kv, md,
                                   np.array([n - 1], np.int32))
    z = np.asarray(logits[0], np.float64) / temperature
    p = np.exp(z - z.max())
    return p / p.sum()


@pytest.mark.parametrize("tree", [pytest.param(False, marks=pytest.mark.slow), True], ids=["chain", "tree"])
def test_sampled_tokens_follow_the_model_distribution(tree):
    """A 16-token vocabulary at temperature 1.5 with random drafts (mostly rejected, often
    accepted by chance): every seed gives the tokens plain sampling gives, and the second
    output token, which a speculating step samples while verifying a draft, follows the model's
    own distribution given the first (a chi-square goodness-of-fit test against softmax of the
    model's logits, per first token, bins under 5 expected samples pooled)."""
    from jinfer.models.config import preset
    from jinfer.models.llama import init_model
    from jinfer.tokenizer import byte_level_tokenizer

    cfg = dataclasses.replace(preset("tiny"), vocab_size=16, bos_token_id=None, eos_token_ids=())
    m, tok = init_model(cfg, seed=3), byte_level_tokenizer()
    n, prompt, temperature = 600, [1, 2, 3], 1.5

    def run(drafter):
        # One 512-token bucket: the run's steps vary in size, and a program per bucket size
        # was most of the test's time.
        engine = Engine(m, tok, CacheConfig(page_size=8, num_pages=512),
                        SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=64, max_model_len=32),
                        options=EngineOptions(min_token_bucket=512), drafter=drafter, max_spec_tokens=4)
        for seed in range(n):
            engine.add_request(prompt, SamplingParams(temperature=temperature, seed=seed, max_tokens=4,
                                                      ignore_eos=True), request_id=f"s{seed}")
        out = {}
        while engine.has_unfinished():
            out.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        return [out[f"s{seed}"] for seed in range(n)], engine.spec_stats()

    plain, _ = run(None)
    spec, stats = run(RandomDrafter(16, tree))
    # (A request whose step is in flight is drafted for only when the random proposal begins
    # with that step's draft: fewer drafts than when every drafted step was read first.)
    assert stats.draft_tokens > 300 and 0 < stats.accepted_tokens < stats.draft_tokens
    assert spec == plain
    chi2, df, fwd = 0.0, 0, jit_forward(m)
    for first in sorted({t[0] for t in spec}):
        seconds = [t[1] for t in spec if t[0] == first]
        expected = len(seconds) * _next_token_probs(m, fwd, prompt + [first], temperature)
        observed = np.bincount(seconds, minlength=16).astype(np.float64)
        big = expected >= 5
        bins_o = np.append(observed[big], observed[~big].sum())
        bins_e = np.append(expected[big], expected[~big].sum())
        keep = bins_e > 0
        chi2 += float(((bins_o[keep] - bins_e[keep]) ** 2 / bins_e[keep]).sum())
        df += int(keep.sum()) - 1
    assert df >= 10, df  # enough bins for the test to say something
    assert _chi2_sf(chi2, df) > 0.001, (chi2, df)


def test_launch_config_builds_drafters_and_names_bad_values():
    from jinfer.launch import default_config, resolve

    cfg = default_config()
    cfg.speculation.method = "suffix"
    cfg.speculation.tree = True
    launch = resolve(cfg)
    drafter = build_drafter(launch.speculation)
    assert type(drafter).__name__ == "SuffixDrafter" and drafter.config.tree
    assert build_drafter(SpeculationConfig()) is None
    with pytest.raises(ValueError, match="method='eagle'; known: \\['das', 'ngram', 'suffix'\\]"):
        SpeculationConfig(method="eagle")
    with pytest.raises(ValueError, match="cannot be loaded"):
        build_drafter(SpeculationConfig(method="no.such.module:Drafter"))
    with pytest.raises(ValueError, match="max_spec_tokens=0 must be in"):
        SpeculationConfig(max_spec_tokens=0)


def test_grpc_reports_speculation_and_lets_a_request_opt_out(model):
    from jinfer.serving.client import Client
    from jinfer.serving.server import Server, ServingConfig

    engine = _engine(model, build_drafter(SpeculationConfig(method="ngram")))
    srv = Server(engine, ServingConfig()).start()
    try:
        with Client(f"127.0.0.1:{srv.port}") as c:
            prompt = "x = 1\nx = 1\nx = 1\nx = 1\n"
            stream = list(c.generate_stream(prompt, temperature=0, max_tokens=24, ignore_eos=True, timeout=120))
            plain = list(c.generate_stream(prompt, temperature=0, max_tokens=24, ignore_eos=True, speculate=False,
                                           timeout=120))
    finally:
        srv.stop(grace=0)
    ids = lambda msgs: [t for m in msgs for t in m.token_ids]  # noqa: E731
    assert ids(stream) == ids(plain) and len(ids(stream)) == 24
    assert stream[-1].usage.draft_tokens > 0 and stream[-1].usage.accepted_draft_tokens > 0
    assert any(len(m.token_ids) > 1 for m in stream)  # several tokens in one message
    assert plain[-1].usage.draft_tokens == plain[-1].usage.spec_steps == 0


def test_sliding_window_models_verify_each_tree_as_its_leading_chain():
    """The tree mask does not combine with a sliding window: such a model's tree drafts are cut
    to their leading chains, and the tokens stay plain decoding's."""
    from jinfer.models.config import preset
    from jinfer.models.llama import init_model
    from jinfer.tokenizer import byte_level_tokenizer

    cfg = dataclasses.replace(preset("tiny"), sliding_window=8)
    m, tok = init_model(cfg, seed=1), byte_level_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [40, 41, 42]]
    want, _ = _run(_engine((m, tok)), prompts, params)
    ref = {rid: list(o.token_ids) for (rid, _), o in want.items()}
    engine = _engine((m, tok), TreeOracleDrafter(ref, vocab=512))
    assert not engine.scheduler.trees
    got, _ = _run(engine, prompts, params)
    assert {k: o.token_ids for k, o in got.items()} == {k: o.token_ids for k, o in want.items()}
    assert engine.spec_stats().accepted_tokens > 0


def test_a_speculating_scheduler_refuses_to_plan_over_an_unsettled_step():
    from jinfer.request import Request
    from jinfer.scheduling import Scheduler

    s = Scheduler(CacheConfig(page_size=4, num_pages=16), SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4,
                                                                          max_model_len=64),
                  16, drafter=RandomDrafter(8, tree=False), max_spec_tokens=3)
    s.add(Request("a", [1, 2, 3], SamplingParams(max_tokens=8), 0, 0.0, 0))
    s.schedule()  # its sample is now pending
    with pytest.raises(AssertionError, match="settle the step in flight first"):
        s.schedule()


def test_the_budget_pipelines_plain_steps_when_drafts_do_not_pay(model):
    """A budget that never wants drafts: the engine runs as plain async decoding (steps
    dispatched before the last is read), with the same tokens and no draft."""
    class Never:
        def wants_drafts(self, num_decoding, *, prefilling=False):
            return False

        def limit(self, request_id, num_decoding, max_draft_tokens):
            raise AssertionError("no draft was wanted")

        def lead_limit(self):
            return None

        def observe_verify(self, request_id, accepted, rejected):
            raise AssertionError("no draft was verified")

        def observe_step(self, num_tokens, seconds, emitted, drafted, *, num_decoding, decode_only, drafting,
                         pipelined):
            assert not drafted
            self.steps = getattr(self, "steps", 0) + 1
            self.pipelined = getattr(self, "pipelined", []) + [pipelined]

        def finish(self, request_id):
            pass

    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want, _ = _run(_engine(model), PROMPTS, params)
    budget = Never()
    m, tok = model
    engine = Engine(m, tok, CacheConfig(page_size=16, num_pages=128),
                    SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256),
                    drafter=OracleDrafter({}), max_spec_tokens=4, draft_budget=budget, programs=PROGRAMS)
    dispatch, fetch, calls = engine.runner.dispatch, engine.runner.fetch, []
    engine.runner.dispatch = lambda plan: calls.append("dispatch") or dispatch(plan)
    engine.runner.fetch = lambda handle: calls.append("fetch") or fetch(handle)
    got, _ = _run(engine, PROMPTS, params)
    assert {k: o.token_ids for k, o in got.items()} == {k: o.token_ids for k, o in want.items()}
    assert calls[:3] == ["dispatch", "dispatch", "fetch"] and budget.steps > 0  # pipelined
    assert all(budget.pipelined[1:])  # each dispatched before the one ahead of it was read (a first, after idle, not)


def test_verify_walks_a_tree_and_says_where_it_stopped():
    """The one draft walk settling uses: a tree 5 -> {6 -> 8, 7 -> 9} (parents -1, 0, 0, 1, 2),
    sampled rows after the root and after each draft token (row 1 + i)."""
    draft, parents = (5, 6, 7, 8, 9), (-1, 0, 0, 1, 2)
    v = verify(draft, parents, [5, 7, 4, 3, 4, 4])  # 5, then 7, then the model disagrees under 7
    assert v.path == (0, 2) and v.emitted == (5, 7, 3) and v.rows == (0, 1, 3) and v.stopped
    leaf = verify(draft, parents, [5, 6, 8, 4, 2, 4])  # 5, 6, 8: a leaf, then the model's own token
    assert leaf.path == (0, 1, 3) and leaf.emitted == (5, 6, 8, 2) and leaf.rows == (0, 1, 2, 4) and not leaf.stopped
    none = verify(draft, parents, [1, 0, 0, 0, 0, 0])
    assert none.path == () and none.emitted == (1,) and none.rows == (0,) and none.stopped
    chain = verify((5, 6), (-1, 0), [5, 6, 7])
    assert chain.emitted == (5, 6, 7) and not chain.stopped


@pytest.mark.parametrize("sampled", [[5, 7, 4, 3, 4, 4], [5, 6, 8, 4, 2, 4], [1, 0, 0, 0, 0, 0], [5, 6, 7, 7, 9, 9],
                                     [5, 7, 0, 9, 0, 0]])  # (the last: slot 8 is a destination and a later source)
@pytest.mark.parametrize("tree", [True, False])
def test_the_step_verifies_drafts_as_settling_does_and_moves_a_trees_path_into_place(sampled, tree):
    """The device side of the walk above (jinfer/device_drafts.py, in each drafted step): the same path, its deepest
    row and the tokens off it, and a tree's accepted path moved to the slots plain decoding
    gives it. One sequence at slots 5.. of pages (2, 0, 3) of 4 slots: its last known token at
    slot 5, draft token i at slot 6 + i; a second sequence with no draft after it."""
    import jax.numpy as jnp

    from jinfer.attention import AttentionMetadata
    from jinfer.kv_cache import KVCache
    from jinfer.device_drafts import DraftRows, accepted_paths, move_paths

    draft, parents = (5, 6, 7, 8, 9), ((-1, 0, 0, 1, 2) if tree else (-1, 0, 1, 2, 3))
    want = verify(draft, parents, sampled)
    rows = DraftRows.empty(8, trees=True)
    rows.add(0, 1, draft, parents if tree else (), Draft(draft, parents).depths())
    row_seq = jnp.array([0] * 6 + [1, 2])
    tokens = jnp.array(sampled + [0, 0])
    acc, deepest, off_path = accepted_paths(tokens, row_seq, rows, 5, num_segments=3)
    on_path = [0] + [1 + i for i in want.path]
    assert [int(r) for r in jnp.flatnonzero(acc[:6])] == on_path
    assert int(deepest[0]) == on_path[-1] and int(off_path[0]) == 5 - len(want.path) and int(off_path[1]) == 0
    pool = jnp.arange(4 * 4, dtype=jnp.float32).reshape(1, 4, 4, 1)  # (page, slot) holds page * 4 + slot
    table = jnp.array([[2, 0, 3], [1, 1, 1]])
    md = AttentionMetadata(jnp.array([0, 6, 7]), jnp.array([11, 1]), table, jnp.array([2]))
    moved = move_paths(KVCache((pool,), (pool + 100,)), md, row_seq, acc, jnp.asarray(rows.move))

    def was(slot):  # the pool's value at the sequence's slot before the move
        return float(table[0, slot // 4] * 4 + slot % 4)
    expect = {6 + m: was(6 + i) for m, i in enumerate(want.path)}  # the m-th path token to slot 6 + m
    for slot in range(12):
        page, inner = int(table[0, slot // 4]), slot % 4
        assert float(moved.k[0][0, page, inner, 0]) == expect.get(slot, was(slot))
        assert float(moved.v[0][0, page, inner, 0]) == expect.get(slot, was(slot)) + 100
    assert float(moved.k[0][0, 1].sum()) == float(pool[0, 1].sum())  # the other sequence's page: untouched


def test_a_draft_below_a_path_is_the_subtree_under_it():
    """Draft.below: what a draft past a step in flight keeps of a proposal (jinfer/drafting.py):
    the tree 5 -> {6 -> {8, 10}, 7 -> 9} under the path (5, 6) is {8, 10}, under (5,) it is
    6 -> {8, 10} beside 7 -> 9, re-indexed in order; a path that leaves the tree gives nothing."""
    tree = Draft((5, 6, 7, 8, 9, 10), (-1, 0, 0, 1, 2, 1))
    assert tree.below(()) == tree
    assert tree.below((5,)) == Draft((6, 7, 8, 9, 10), (-1, -1, 0, 1, 0))
    assert tree.below((5, 6)) == Draft((8, 10), (-1, -1))
    assert tree.below((5, 7, 9)) == NO_DRAFT and tree.below((6,)) == NO_DRAFT and tree.below((5, 8)) == NO_DRAFT
    assert Draft.chain((1, 2, 3)).below((1,)) == Draft.chain((2, 3))
