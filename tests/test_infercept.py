"""Requests paused for a tool call (jinfer.pausing, scheduler/infercept): whichever way their
K/V waits (kept, dropped into the prefix cache, swapped to the host tier), a resumed request
produces exactly the tokens of one run over prompt + output + tool tokens, and no page leaks."""

import dataclasses

import pytest

from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.pausing import DISCARD, PRESERVE, SWAP, PauseView
from jinfer.request import Status
from jinfer.sampling_params import SamplingParams
from jinfer.tokenizer import Tokenizer
from scheduler.infercept.policies import DiscardAll, InferCept, PauseProfile, PinTTL, PreserveAll, SwapAll

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
PROMPT = [11, 42, 7, 99, 3, 58, 120, 64, 5, 200, 17, 33, 8]
OTHER = [9, 8, 7, 6, 5, 4, 3, 2, 1, 250, 240, 230]
TOOL = [71, 72, 73, 74, 75, 76]


@pytest.fixture(scope="module")
def engines(hf_checkpoints):
    path = hf_checkpoints["llama3"]
    model, tok = load_hf_model(path), Tokenizer.from_dir(path)

    def make(pipelined):
        return Engine(model, tok, CacheConfig(page_size=4, num_pages=48),
                      SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=96),
                      options=EngineOptions(async_scheduling=pipelined))
    return {True: make(True), False: make(False)}


def _until(engine, done):
    outs = []
    for _ in range(200):
        outs += engine.step()
        if done(outs):
            return outs
    raise AssertionError("never got there")


def _check_pages(engine):
    """Every page is free or cached; nothing is paused or swapped."""
    sched = engine.scheduler
    assert not sched.running and not sched.waiting and not sched.paused and not len(engine.host_kv)
    assert sched.kv.num_free + sched.kv.num_cached == sched.pool.num_pages
    if sched.prefix_cache is not None:
        sched.prefix_cache.check()


def _marker(engine, params):
    """PROMPT's uninterrupted output and a token of it to pause at: its first occurrence there,
    and absent from the run that follows the tool call (so the request pauses once)."""
    full = engine.generate([PROMPT], params)[0].token_ids
    for k in range(2, len(full) - 1):
        after = engine.generate([PROMPT + full[:k + 1] + TOOL], params)[0].token_ids
        if full[k] not in full[:k] and full[k] not in after:
            return full, full[k]
    raise AssertionError("no token pauses once")


def _pause_resume(engine, params, policy, other=True):
    """Runs PROMPT until it pauses at a token of its output, lets the policy act for two steps while
    another request runs, resumes it with TOOL; returns (first segment, second segment, the
    actions seen)."""
    engine.scheduler.pause_policy = policy
    full, marker = _marker(engine, params)
    p = dataclasses.replace(params, intercept_token_ids=(marker,))
    engine.add_request(PROMPT, p, request_id="a")
    if other:
        engine.add_request(OTHER, GREEDY, request_id="b")
    outs = _until(engine, lambda outs: any(o.paused for o in outs))
    seg1 = next(o for o in outs if o.paused).token_ids
    assert seg1[-1] == marker and marker not in seg1[:-1] and engine.num_paused() == 1
    actions = set()
    for _ in range(2):
        engine.step()
        actions.add(engine.scheduler.paused[0].pause.action)
    assert engine.is_unfinished("a") and not any(o.request_id == "a" and o.finished for o in outs)
    engine.resume("a", TOOL)
    outs = _until(engine, lambda outs: any(o.request_id == "a" and o.finished for o in outs))
    seg2 = next(o for o in outs if o.request_id == "a" and o.finished).token_ids
    _until(engine, lambda _: not engine.has_unfinished())
    return full, seg1, seg2, actions


class ChunkedSwaps(SwapAll):
    """Swaps everything, one page of K/V per step: resumed after two steps, a request has swapped
    part of its context out and kept the rest."""

    def swap_budget_tokens(self, view):
        return view.page_size


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("policy, action", [(PreserveAll(), PRESERVE), (DiscardAll(), DISCARD), (SwapAll(), SWAP),
                                            (ChunkedSwaps(), SWAP)],
                         ids=["preserve", "discard", "swap", "swap-chunks"])
def test_a_resumed_request_equals_one_run_over_prompt_output_and_tool_tokens(engines, params, policy, action):
    engine = engines[True]
    kept, restores = [], []
    if isinstance(policy, ChunkedSwaps):
        sched = engine.scheduler
        resume, start_restore = sched.resume, sched._start_restore

        def resume_noting(req, *args):  # pages still on the device, with part of its K/V swapped out
            kept.append(len(req.pages) * bool(req.pause.swapped_tokens))
            return resume(req, *args)

        def start_restore_noting(step, req):  # its chunks coming back over several steps
            restores.append(len(req.pause.swap_chunks))
            return start_restore(step, req)
        sched.resume, sched._start_restore = resume_noting, start_restore_noting
    try:
        full, seg1, seg2, actions = _pause_resume(engine, params, policy)
    finally:
        engine.scheduler.__dict__.pop("resume", None)
        engine.scheduler.__dict__.pop("_start_restore", None)
    assert actions == {action}
    if isinstance(policy, ChunkedSwaps):  # resumed with part of its K/V still on the device, part out,
        assert len(kept) == 1 and kept[0] > 0  # then swapped back in chunks
        assert len(restores) == 1 and restores[0] > 1
    assert seg1 == full[:len(seg1)]  # up to the tool call, the same run
    fresh = engine.generate([PROMPT + seg1 + TOOL], params)[0].token_ids
    assert seg2 == fresh and len(seg2) == params.max_tokens
    if action == SWAP:
        assert engine.host_kv.swapped_out > 0 and engine.host_kv.swapped_in == engine.host_kv.swapped_out
    _check_pages(engine)


def test_without_pipelining_and_with_least_waste_choices(engines):
    engine = engines[False]
    clock = [0.0]
    profile = PauseProfile(lambda n: 1e-3 * n, lambda n: 0.0, 1.0, 8)  # swaps free: it swaps
    policy = InferCept(profile, clock=lambda: clock[0])
    full, seg1, seg2, actions = _pause_resume(engine, GREEDY, policy)
    assert actions == {SWAP} and policy.decisions[SWAP] >= 1
    assert seg2 == engine.generate([PROMPT + seg1 + TOOL], GREEDY)[0].token_ids
    _, seg1, seg2, actions = _pause_resume(engine, GREEDY, PinTTL(ttl_s=1e9))
    assert actions == {PRESERVE} and seg2 == engine.generate([PROMPT + seg1 + TOOL], GREEDY)[0].token_ids
    _check_pages(engine)


def test_least_waste_preserves_short_pauses_and_discards_long_ones():
    """InferCept's rule on its own: no swap budget (a slow host link), a context of 64 tokens;
    preserved while the pause so far is short, discarded once holding costs more than
    recomputing."""
    from jinfer.pausing import Pause
    from jinfer.request import Request
    profile = PauseProfile(lambda n: 1e-3 * n, lambda n: 1.0 * n, 2.0, 16)
    now = [0.0]
    policy = InferCept(profile, clock=lambda: now[0])
    req = Request("r", list(range(64)), GREEDY, 0, 0.0, 0, num_computed_tokens=64, pause=Pause(since=0.0))
    view = PauseView(4, 10, 64, running_tokens=100, running=2, waiting=0, last_step_s=0.01)
    now[0] = 0.001
    assert policy.decide([req], view) == {"r": PRESERVE}
    preserve, discard = policy.wastes(req, view, 10.0)
    assert preserve == pytest.approx(10.0 * 64 * 2.0) and preserve > discard
    now[0] = 10.0
    assert policy.decide([req], view) == {"r": DISCARD}
    # A step long enough to hide a copy of 64 tokens (T_swap = 1 s per token): swapped instead;
    # with room for one of two, the one wasting more (the longer context) goes first, and the
    # other starts (in chunks) only if a page of the budget is left.
    big = Request("big", list(range(96)), GREEDY, 0, 0.0, 1, num_computed_tokens=96, pause=Pause(since=0.0))
    assert policy.decide([req], dataclasses.replace(view, last_step_s=64.0)) == {"r": SWAP}
    assert policy.decide([req, big], dataclasses.replace(view, last_step_s=99.0)) == {"big": SWAP, "r": DISCARD}
    assert policy.decide([req, big], dataclasses.replace(view, last_step_s=100.0)) == {"big": SWAP, "r": SWAP}
    assert policy.decide([req, big], dataclasses.replace(view, last_step_s=1e9, swap_budget=70)) == {
        "big": SWAP, "r": DISCARD}  # the mechanism's budget, what swaps under way left, decides
    # Without a copy engine (a CPU) nothing hides a swap: it competes on its own waste,
    # 2 * T_swap(C) * (C_batch + C) * M.
    cpu = InferCept(dataclasses.replace(profile, swap_s=lambda n: 1e-6 * n, swap_overlaps=False), clock=lambda: now[0])
    assert cpu.swap_waste(req, view) == pytest.approx(2 * 64e-6 * (100 + 64) * 2.0)
    assert cpu.decide([req], dataclasses.replace(view, last_step_s=1e9)) == {"r": SWAP}  # cheapest of the three
    slow = InferCept(dataclasses.replace(profile, swap_overlaps=False), clock=lambda: now[0])  # 1 s per token
    assert slow.decide([req], dataclasses.replace(view, last_step_s=1e9)) == {"r": DISCARD}


def test_bad_resumes_change_nothing_and_aborting_a_paused_request_frees_everything(engines):
    engine = engines[True]
    engine.scheduler.pause_policy = SwapAll()
    _, marker = _marker(engine, GREEDY)
    with pytest.raises(ValueError, match="not unfinished"):
        engine.resume("nobody", TOOL)
    engine.add_request(PROMPT, dataclasses.replace(GREEDY, intercept_token_ids=(marker,)), request_id="a")
    with pytest.raises(ValueError, match="not paused"):
        engine.resume("a", TOOL)
    _until(engine, lambda outs: any(o.paused for o in outs))
    engine.step()  # swapped out
    assert engine.scheduler.paused[0].pause.action == SWAP and len(engine.host_kv) == 1
    with pytest.raises(ValueError, match="max_model_len"):
        engine.resume("a", [1] * 200)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.resume("a", [10**6])
    assert engine.scheduler.paused[0].status is Status.PAUSED  # still paused, still swapped
    assert not engine.has_unfinished() and engine.is_unfinished("a")
    assert engine.abort("a")
    _check_pages(engine)


def _sim(policy, items, num_pages=400, swap_s_per_page=1e-5):
    from scheduler.cost_model import analytic_8b_h100_tp
    from scheduler.routing.policies import make_router
    from scheduler.simulation.simulator import ReplicaConfig, Simulator
    cost = analytic_8b_h100_tp(1)
    rc = ReplicaConfig(num_pages=num_pages, swap_s_per_page=swap_s_per_page)
    sim = Simulator(make_router("round-robin", 1, cost, rc.capacity_tokens), 1, cost, rc, pause_policy=policy)
    return sim, sim.run(items)


def test_the_simulator_pauses_and_resumes_items_with_tool_calls():
    """Every augmented request finishes with all its segments' tokens, having waited its tools'
    time; pages all come back; each policy does what it says (preserve recomputes nothing with
    room to spare, swap moves K/V instead, discard recomputes), and runs repeat exactly."""
    from scheduler.infercept.workloads import augmented
    items = augmented(40, rate=20.0, scale=8, pause_scale=0.01, seed=3)
    assert all(it.tool_calls for it in items)
    want = [it.max_tokens + sum(c.after_tokens for c in it.tool_calls) for it in items]
    runs = {}
    for name, policy in [("preserve", lambda c: PreserveAll()), ("swap", lambda c: SwapAll()),
                         ("discard", lambda c: DiscardAll())]:
        sim, res = _sim(policy, items, num_pages=4000)
        assert [r.output_tokens for r in res.records] == want and not any(r.error for r in res.records)
        assert [r.tool_calls for r in res.records] == [len(it.tool_calls) for it in items]
        assert all(r.tool_s == pytest.approx(sum(c.pause_s for c in it.tool_calls)) for r, it in zip(res.records, items))
        sched = sim.replicas[0].sched
        assert not sched.paused and sched.kv.num_free + sched.kv.num_cached == 4000
        runs[name] = sched.pause_stats
        assert runs[name].paused == runs[name].resumed == sum(len(it.tool_calls) for it in items)
    assert runs["preserve"].recomputed_tokens == 0 and runs["preserve"].idle_page_s > 0
    assert runs["swap"].swapped_out_tokens == runs["swap"].swapped_in_tokens > 0 and runs["swap"].idle_page_s == 0
    assert runs["discard"].discarded_tokens > 0
    a = _sim(lambda c: InferCept(PauseProfile(lambda n: 1e-4 * n, lambda n: 1e-6 * n, 1.0, 64), clock=c), items)[1]
    b = _sim(lambda c: InferCept(PauseProfile(lambda n: 1e-4 * n, lambda n: 1e-6 * n, 1.0, 64), clock=c), items)[1]
    assert [(r.finish_s, r.output_tokens) for r in a.records] == [(r.finish_s, r.output_tokens) for r in b.records]


def test_augmented_workloads_are_seeded_and_checked():
    from scheduler.infercept.workloads import AUGMENTS, augmented
    a, b = augmented(30, 5.0, seed=1), augmented(30, 5.0, seed=1)
    assert a == b and a != augmented(30, 5.0, seed=2)
    assert all(x.arrival_s < y.arrival_s for x, y in zip(a, a[1:]))
    only = augmented(50, 5.0, types=("math",), seed=0)
    assert max(c.pause_s for it in only for c in it.tool_calls) < 0.01  # math tools return at once
    assert set(AUGMENTS) == {"math", "qa", "virtual-env", "chatbot", "image", "tts"}
    with pytest.raises(ValueError, match="unknown augment types"):
        augmented(3, 1.0, types=("search",))


def test_trace_replay_pauses_at_given_positions_and_the_live_replay_finishes_everything(engines):
    """Engine intercept_after (a trace's tool-call positions) pauses a request there whatever it
    samples; harness.tool_calls.replay serves an augmented workload to the end on it."""
    from harness.tool_calls import replay
    from scheduler.infercept.workloads import augmented
    engine = engines[True]
    engine.scheduler.pause_policy = InferCept(PauseProfile(lambda n: 1e-3 * n, lambda n: 1e-6 * n, 1.0, 64))
    engine.add_request(PROMPT, GREEDY, request_id="t", intercept_after=3)
    outs = _until(engine, lambda outs: any(o.paused for o in outs))
    assert [len(o.token_ids) for o in outs if o.paused] == [3]
    with pytest.raises(ValueError, match="intercept_after"):
        engine.resume("t", TOOL, intercept_after=0)
    engine.resume("t", TOOL, intercept_after=2)
    outs = _until(engine, lambda outs: any(o.paused for o in outs))
    assert [len(o.token_ids) for o in outs if o.paused] == [2]
    engine.abort("t")
    items = augmented(6, rate=50.0, scale=64, pause_scale=0.0, seed=5)
    records, _ = replay(engine, items, vocab=256)
    assert all(r.finish_s == r.finish_s and r.tool_calls == len(it.tool_calls) for r, it in zip(records, items))
    assert [r.output_tokens for r in records] == [it.max_tokens + sum(c.after_tokens for c in it.tool_calls)
                                                  for it in items]
    _check_pages(engine)


@pytest.mark.parametrize("policy", [PreserveAll(), SwapAll()], ids=["preserve", "swap"])
def test_an_empty_tool_output_resumes_as_one_run_over_prompt_and_output(engines, policy):
    """Nothing to append: the request's last token is computed again (its logits give the
    next), so the resume equals a run over prompt + output."""
    engine = engines[True]
    engine.scheduler.pause_policy = policy
    full, marker = _marker(engine, GREEDY)
    engine.add_request(PROMPT, dataclasses.replace(GREEDY, intercept_token_ids=(marker,)), request_id="e")
    engine.add_request(OTHER, GREEDY, request_id="o")
    outs = _until(engine, lambda outs: any(o.paused for o in outs))
    seg1 = next(o for o in outs if o.paused).token_ids
    engine.step()
    engine.resume("e", [])
    outs = _until(engine, lambda outs: any(o.request_id == "e" and o.finished for o in outs))
    got = next(o for o in outs if o.request_id == "e" and o.finished).token_ids
    _until(engine, lambda _: not engine.has_unfinished())
    after = engine.generate([PROMPT + seg1], GREEDY)[0].token_ids
    assert got == after[:len(got)] and (marker not in after[:len(got)] or got[-1] == marker)
    _check_pages(engine)


def test_paused_requests_give_way_when_nothing_else_fits_and_migrate_without_their_host_copy(engines):
    """Preserved KV that leaves waiting requests no room is dropped after one empty step (they
    run; the paused one recomputes on resume); a swapped-out request exported to another engine
    computes its KV again there and still equals one run; generate() refuses intercept tokens."""
    src, dst = engines[True], engines[False]
    with pytest.raises(ValueError, match="intercept_token_ids"):
        src.generate([PROMPT], dataclasses.replace(GREEDY, intercept_token_ids=(1,)))
    src.scheduler.pause_policy = PreserveAll()
    full, marker = _marker(src, GREEDY)
    params = dataclasses.replace(GREEDY, intercept_token_ids=(marker,))
    src.add_request(PROMPT, params, request_id="p")
    for i in range(7):  # seven more paused requests of 5 pages each: 40 of the 48 held
        src.add_request([100 + i] * 18, GREEDY, request_id=f"h{i}", intercept_after=1)
    outs = _until(src, lambda outs: sum(o.paused for o in outs) == 8)
    seg1 = next(o for o in outs if o.paused and o.request_id == "p").token_ids
    assert sum(len(r.pages) for r in src.scheduler.paused) > 48 - 21
    src.add_request(list(range(5, 85)), dataclasses.replace(GREEDY, max_tokens=4), request_id="big")  # 21 pages
    _until(src, lambda outs: any(o.request_id == "big" and o.finished for o in outs))
    assert all(r.pause.action == DISCARD for r in src.scheduler.paused)
    for i in range(7):
        src.abort(f"h{i}")
    src.scheduler.pause_policy = SwapAll()
    src.add_request(PROMPT, params, request_id="q")
    _until(src, lambda outs: any(o.request_id == "q" and o.paused for o in outs))
    src.step()
    assert len(src.host_kv) == 1
    moved = src.export_requests(["p", "q"])
    assert not len(src.host_kv) and not src.scheduler.paused
    dst.import_requests(moved)
    assert dst.num_paused() == 2
    for rid in ("p", "q"):
        dst.resume(rid, TOOL)
        outs = _until(dst, lambda outs: any(o.request_id == rid and o.finished for o in outs))
        got = next(o for o in outs if o.request_id == rid and o.finished).token_ids
        assert got == dst.generate([PROMPT + seg1 + TOOL], GREEDY)[0].token_ids
    _check_pages(src)
    _check_pages(dst)


def test_a_requeueing_policy_puts_the_resumed_request_behind_later_arrivals():
    """RequeueDiscard (vLLM's way): the continuation queues as a new arrival would; the
    default keeps the request's first-arrival place."""
    from jinfer.config import CacheConfig, SchedulerConfig
    from jinfer.request import Request
    from jinfer.scheduling import Scheduler
    from scheduler.infercept.policies import RequeueDiscard
    for policy, first in [(DiscardAll(), "a"), (RequeueDiscard(), "b")]:
        s = Scheduler(CacheConfig(page_size=4, num_pages=32), SchedulerConfig(64, 1, 64), 32, pause_policy=policy)
        a = Request("a", [1, 2, 3], dataclasses.replace(GREEDY, intercept_token_ids=(9,)), 0, 0.0, 0)
        s.add(a)
        plan = s.schedule()
        s.update(plan, [a], [9])
        assert a.status is Status.PAUSED
        s.add(Request("b", [4, 5, 6], GREEDY, 0, 0.0, 1))
        s.resume(a, [7])
        assert s.schedule().seqs[0].request_id == first  # max_num_seqs=1: one of them runs


def test_an_intercept_string_pauses_after_the_text_that_completes_it(engines):
    """SamplingParams.intercept: the request pauses once its text contains the string (kept in
    the text), and resumes as one run over prompt + output + tool tokens."""
    engine = engines[True]
    engine.scheduler.pause_policy = DiscardAll()
    full = engine.generate([PROMPT], GREEDY)[0]
    text = full.text
    cut = next(k for k in range(2, len(text)) if text[:k].strip())  # the first piece of visible text
    mark = text[cut - 2:cut]
    params = dataclasses.replace(GREEDY, intercept=(mark,))
    engine.add_request(PROMPT, params, request_id="s")
    outs = _until(engine, lambda outs: any(o.paused for o in outs))
    paused = next(o for o in outs if o.paused)
    assert mark in paused.text and paused.text == "".join(o.new_text for o in outs if o.request_id == "s")
    assert paused.token_ids == full.token_ids[:len(paused.token_ids)]
    engine.resume("s", TOOL)
    outs = _until(engine, lambda outs: any(o.request_id == "s" and (o.finished or o.paused) for o in outs))
    got = next(o for o in outs if o.request_id == "s" and (o.finished or o.paused)).token_ids
    want = engine.generate([PROMPT + paused.token_ids + TOOL], GREEDY)[0].token_ids
    assert got == want[:len(got)]
    if engine.is_unfinished("s"):
        engine.abort("s")
    _check_pages(engine)
    with pytest.raises(ValueError, match="intercept"):
        SamplingParams(intercept=("",))


def test_warm_swaps_compiles_every_size_and_changes_nothing(engines):
    engine = engines[False]
    before = engine.generate([PROMPT], GREEDY)[0].token_ids
    assert engine.warm_swaps() == 6  # 1, 2, 4, 8, 16, 32 pages (24 per request at most: padded to 32)
    assert not len(engine.host_kv) and engine.host_kv.swapped_out == 0
    assert engine.generate([PROMPT], GREEDY)[0].token_ids == before
    _check_pages(engine)
