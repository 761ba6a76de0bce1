"""Drafts in flight: with async scheduling, a step carrying drafts (chains or trees) pipelines
like a plain one. The next step is planned as if the drafts are all accepted; where fewer are,
the runner moves the request's positions, KV slots and sampling index back on the device (and
a tree's accepted path to the slots plain decoding gives it). Tokens stay those of plain
decoding (greedy and seeded sampling, under preemption), and the steps that relied on a draft
in flight, accepted whole or cut short, do happen."""

import dataclasses
import zlib

import pytest

from jinfer.speculation import NO_DRAFT, Draft, verify
from jinfer.step_plan import PENDING
from tests.test_speculation import GREEDY, PROMPTS, SAMPLED, OracleDrafter, _engine, _reference, _run
from tests.test_speculation import model  # noqa: F401 - the fixture


class StableOracle(OracleDrafter):
    """The reference continuation with the same tokens wrong at every proposal (a token is
    wrong by its request and output index, one in `every`; 0: none), so a proposal made while a
    step is in flight agrees with that step's draft, and a draft is cut short where a wrong
    token sits."""

    def __init__(self, reference, every: int = 5):
        super().__init__(reference)
        self.every = every

    def propose(self, request_id, output_ids, max_draft_tokens):
        assert 0 < max_draft_tokens and list(output_ids) == self.observed[request_id]
        start = len(output_ids)
        nxt = self.reference.get(request_id, [])[start:start + max_draft_tokens]
        toks = [t if not self.every or zlib.crc32(f"{request_id}:{start + i}".encode()) % self.every
                else (t + 1) % self.vocab for i, t in enumerate(nxt)]
        return Draft.chain(toks) if toks else NO_DRAFT


class StableTreeOracle(StableOracle):
    """StableOracle's chain (shorter by three), and under its first wrong token's parent a
    branch of the right token and up to two more: verification then takes a later child, so
    the accepted path's K/V must move."""

    def propose(self, request_id, output_ids, max_draft_tokens):
        chain = super().propose(request_id, output_ids, max(1, max_draft_tokens - 3)).tokens
        right = self.reference.get(request_id, [])[len(output_ids):]
        wrong = next((i for i, t in enumerate(chain) if t != right[i]), None)
        if wrong is None:
            return Draft.chain(chain) if chain else NO_DRAFT
        branch = right[wrong:wrong + 3][:max_draft_tokens - len(chain)]
        parents = list(range(-1, len(chain) - 1)) + [wrong - 1] + list(range(len(chain), len(chain) + len(branch) - 1))
        return Draft(tuple(chain) + tuple(branch), tuple(parents[:len(chain) + len(branch)]))


def _watch(engine):
    """Records, for every settled sequence with a draft, (its request's next step was already
    planned, draft tokens, accepted, its accepted path left the leading chain: a tree's K/V
    moved), and counts plans with a draft after a PENDING token (and of them, those past a tree
    draft in flight)."""
    seen = {"settled": [], "past_pending": 0, "past_tree": 0}
    sched = engine.scheduler
    update, schedule = sched.update, sched.schedule

    def watched_update(plan, reqs, sampled, **kw):
        before = [(req.num_pending > 1, req.num_accepted_tokens) for req in reqs]
        out = update(plan, reqs, sampled, **kw)
        for seq, req, (ahead, acc), rows in zip(plan.seqs, reqs, before, sampled):
            if seq.num_draft:
                k = seq.num_draft
                path = verify(seq.token_ids[-k:], seq.draft_parents or tuple(range(-1, k - 1)), rows).path
                moved = path != tuple(range(len(path)))
                seen["settled"].append((ahead, k, req.num_accepted_tokens - acc, moved))
        return out

    def watched_schedule(*a, **kw):
        plan = schedule(*a, **kw)
        running = {r.request_id: r for r in sched.running}
        past = [running[s.request_id] for s in plan.seqs if s.num_draft and s.token_ids[0] == PENDING]
        seen["past_pending"] += len(past)
        seen["past_tree"] += sum(1 for r in past if len(r.tentative) > 1 and not r.tentative[-2].is_chain)
        return plan

    sched.update, sched.schedule = watched_update, watched_schedule
    return seen


@pytest.mark.parametrize("params, num_pages, oracle", [(SAMPLED, 128, StableOracle), (GREEDY, 10, StableOracle),
                                                      (SAMPLED, 128, StableTreeOracle)],
                         ids=["sampled", "preempting-greedy", "sampled-trees"])
def test_drafted_steps_pipeline_and_keep_the_tokens(model, params, num_pages, oracle):  # noqa: F811
    params = dataclasses.replace(params, max_tokens=24)
    want, plain_steps, ref = _reference(model, params, num_pages=num_pages)
    drafter = oracle(ref)
    engine = _engine(model, drafter, num_pages=num_pages)
    assert engine.scheduler.drafts_in_flight
    seen = _watch(engine)
    preempt, preemptions = engine.scheduler.preempt, []
    engine.scheduler.preempt = lambda req: preemptions.append(req.request_id) or preempt(req)
    got, steps = _run(engine, PROMPTS, params)
    assert {k: o.token_ids for k, o in got.items()} == {k: o.token_ids for k, o in want.items()}
    assert {k: o.text for k, o in got.items()} == {k: o.text for k, o in want.items()}
    assert bool(preemptions) == (num_pages < 64)
    assert steps < plain_steps
    # Steps were planned on drafts in flight: drafts past a PENDING token, and drafts whose
    # request's next step was planned before they were read, all accepted and cut short.
    assert seen["past_pending"] > 0
    ahead = [(k, a, moved) for planned, k, a, moved in seen["settled"] if planned]
    assert any(a == k for k, a, _ in ahead) and any(a < k for k, a, _ in ahead)
    # Trees: paths through a later child (their K/V moved on the device) with the next step
    # planned, and drafts planned past a tree in flight.
    assert any(moved for _, _, moved in ahead) == (oracle is StableTreeOracle)
    assert (seen["past_tree"] > 0) == (oracle is StableTreeOracle)
    load = engine.load()
    assert load.free_pages + load.cached_pages == load.num_pages
    for rid, (output, aborted) in drafter.finished.items():
        assert not aborted and output == ref[rid] == drafter.observed[rid]


def test_drafts_in_flight_off_reads_each_drafted_step_first(model):  # noqa: F811
    """EngineOptions.drafts_in_flight=False: no step is planned past an unread draft."""
    _, _, ref = _reference(model, GREEDY)
    engine = _engine(model, StableOracle(ref), in_flight=False)
    assert not engine.scheduler.drafts_in_flight
    seen = _watch(engine)
    got, _ = _run(engine, PROMPTS, GREEDY)
    assert {(f"{rid}/{k}" if k else rid): o.token_ids for (rid, k), o in got.items()} == ref
    assert seen["past_pending"] == 0 and seen["settled"]
    assert not any(planned for planned, _, _, _ in seen["settled"])


class ContextOracle(StableOracle):
    """StableOracle keyed by the request's prompt, so a request resumed after a tool call (a
    new prompt: its old prompt, output and the tool's tokens) is drafted its new continuation."""

    def start(self, request_id, prompt_ids):
        self.started[request_id], self.observed[request_id] = tuple(prompt_ids), []

    def propose(self, request_id, output_ids, max_draft_tokens):
        self.reference[request_id] = self.reference[self.started[request_id]]
        return super().propose(request_id, output_ids, max_draft_tokens)

    def finish(self, request_id, output_ids, aborted):
        self.finished[request_id] = (list(output_ids), aborted)


def test_a_pause_with_a_draft_in_flight_past_it_resumes_as_one_run(model):  # noqa: F811
    """A request pauses at a tool call while the step after it, already dispatched, carries a
    draft past the call: those positions are not the request's, so a policy that keeps its K/V
    resumes it as one run over prompt, output and tool tokens."""
    from jinfer.pausing import PRESERVE
    from scheduler.infercept.policies import PreserveAll

    plain = _engine(model)
    prompt = plain.tokenizer.encode(PROMPTS[0])
    full = plain.generate([prompt], GREEDY)[0].token_ids
    tool = [71, 72, 73, 74, 75, 76]
    for k in (i for i in range(8, len(full)) if full[i] not in full[:i]):  # a token it pauses at once
        fresh = plain.generate([prompt + full[:k + 1] + tool], GREEDY)[0].token_ids
        if full[k] not in fresh:
            break
    # Drafts always right: the step after the pause's carries a draft past it.
    engine = _engine(model, ContextOracle({tuple(prompt): full, tuple(prompt + full[:k + 1] + tool): fresh}, every=0))
    engine.scheduler.pause_policy = PreserveAll()
    sched, past = engine.scheduler, []
    pause = sched._pause
    sched._pause = lambda req: past.append(req.num_computed_tokens - len(req.all_ids)) or pause(req)
    engine.add_request(prompt, dataclasses.replace(GREEDY, intercept_token_ids=(full[k],)), request_id="a")
    outs = []
    while not any(o.paused for o in outs):
        outs += engine.step()
    assert next(o for o in outs if o.paused).token_ids == full[:k + 1]
    assert past and past[0] > 0  # the step in flight computed a draft past the tool call
    engine.step()
    assert sched.paused[0].pause.action == PRESERVE and sched.paused[0].num_computed_tokens <= k + 1 + len(prompt)
    engine.resume("a", tool)
    while engine.has_unfinished():
        outs += engine.step()
    assert next(o for o in outs if o.finished).token_ids == fresh
    load = engine.load()
    assert load.free_pages + load.cached_pages == load.num_pages
