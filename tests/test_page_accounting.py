"""Property tests: random add/step/abort sequences never leak, double-free or go negative."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.page_pool import PagePool
from jinfer.prefix_cache import PrefixCache
from jinfer.request import Request, Status
from jinfer.sampling_params import SamplingParams
from jinfer.scheduling import Scheduler
from jinfer.speculation import Draft

PAGE = 4
NUM_PAGES = 12
EOS = 99  # the scheduler's EOS id: a sampled row ends its request 1 time in 20


def _check_invariants(s: Scheduler):
    refs = [s.pool.refcount(p) for p in range(NUM_PAGES)]
    assert min(refs) >= 0
    expected = [0] * NUM_PAGES
    for req in s.running + s.waiting + s.paused:
        for p in req.pages:
            expected[p] += 1
    if s.prefix_cache is not None:
        for node in s.prefix_cache.nodes():
            for p in node.pages:
                expected[p] += 1
            assert node.lock_ref >= 0
        s.prefix_cache.check()  # evict() chooses among a running set of unlocked leaves: exact
    assert refs == expected, "refcounts disagree with holders"
    assert s.pool.num_free == expected.count(0)


class RandomDrafter:
    """Drafts of random length and tokens; checks the scheduler's calls come in order."""

    def __init__(self, rng):
        self.rng, self.live = rng, set()

    def start(self, request_id, prompt_ids):
        assert request_id not in self.live
        self.live.add(request_id)

    def propose(self, request_id, output_ids, max_draft_tokens):
        assert request_id in self.live and max_draft_tokens > 0
        tokens = self.rng.integers(0, 8, int(self.rng.integers(0, max_draft_tokens + 1))).tolist()
        return Draft.chain([EOS if self.rng.random() < 0.05 else t for t in tokens])  # an accepted EOS ends mid-draft

    def observe(self, request_id, new_tokens):
        assert request_id in self.live and new_tokens

    def finish(self, request_id, output_ids, aborted):
        self.live.remove(request_id)


class FakeEngine:
    """What Engine does around the scheduler, with random tokens in place of a model: steps are
    settled by the scheduler's own Scheduler.update, as the engine and simulator settle them.

    In async mode a step's samples are read back only after the next step is scheduled, as in
    Engine with async_scheduling, so plans carry PENDING tokens and finished requests linger.
    """

    def __init__(self, s: Scheduler, rng, pipelined: bool):
        self.s, self.rng, self.pipelined = s, rng, pipelined
        self.inflight = None
        self.live: set[str] = set()

    def add(self, req: Request, n: int):
        followers = [Request(f"{req.request_id}/{i}", list(req.prompt_ids), req.params, 0, 0.0,
                             req.arrival_index, sample_group=i) for i in range(1, n)]
        req.followers = followers
        self.live |= {req.request_id} | {f.request_id for f in followers}
        self.s.add(req)
        return [req] + followers

    def resume(self, req: Request, tool: list[int]):
        """As Engine.resume: the step in flight is read first."""
        if self.inflight is not None:
            done, self.inflight = self.inflight, None
            self._read(*done)
        if req.status is Status.PAUSED and len(req.all_ids) + len(tool) + req.params.max_tokens <= NUM_PAGES * PAGE:
            self.s.resume(req, tool)

    def abort(self, req: Request):
        for f in req.followers:
            self.live.discard(f.request_id)
        self.s.abort([req])
        self.live.discard(req.request_id)

    def step(self):
        plan = self.s.schedule()
        by_id = {r.request_id: r for r in self.s.running + self.s.waiting}
        launched = (plan, [by_id[q.request_id] for q in plan.seqs])
        done, self.inflight = self.inflight, launched
        if done:
            self._read(*done)
        if not self.pipelined:
            done, self.inflight = self.inflight, None
            self._read(*done)
        return plan

    def _read(self, plan, reqs):
        tokens = []  # sampled rows; tiny vocab: shared prefixes
        for seq in plan.seqs:
            token = EOS if self.rng.random() < 0.05 else int(self.rng.integers(0, 8))
            if seq.num_draft:  # verification keeps a random prefix of the draft, then the model's token
                draft = list(seq.token_ids[-seq.num_draft:])
                accepted = int(self.rng.integers(0, seq.num_draft + 1))
                if accepted < len(draft) and token == draft[accepted]:
                    token = (token + 1) % 8  # the model disagrees there
                token = draft[:accepted] + [token] + [0] * (len(draft) - accepted)
            tokens.append(token)
        for done in self.s.update(plan, reqs, tokens):
            if done.finish_reason:
                for f in done.req.followers:
                    self.live.discard(f.request_id)
                self.live.discard(done.req.request_id)


class RandomPauses:
    """A pause policy answering at random for every paused request, every step."""

    def __init__(self, rng):
        self.rng = rng

    def decide(self, paused, view):
        return {r.request_id: ("preserve", "discard", "swap")[int(self.rng.integers(0, 3))] for r in paused}

    def swap_budget_tokens(self, view):
        """No limit, or 0-3 pages a step: swaps in chunks, resumed before they end or not."""
        n = int(self.rng.integers(0, 5))
        return None if n == 4 else n * view.page_size


ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 30), st.integers(1, 12), st.integers(1, 3)),
    st.tuples(st.just("step"), st.integers(1, 3), st.just(0), st.just(0)),
    st.tuples(st.just("abort"), st.integers(0, 50), st.just(0), st.just(0)),
    st.tuples(st.just("resume"), st.integers(0, 50), st.integers(0, 6), st.just(0)),
), min_size=1, max_size=40)


@pytest.mark.parametrize("pipelined, drafts", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("prefix", [True, False])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, seed=st.integers(0, 2**16))
def test_random_add_step_abort_keeps_pages_consistent(prefix, pipelined, drafts, ops, seed):
    rng = np.random.default_rng(seed)
    drafter = RandomDrafter(rng) if drafts else None
    s = Scheduler(CacheConfig(page_size=PAGE, num_pages=NUM_PAGES, enable_prefix_cache=prefix),
                  SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4, max_model_len=NUM_PAGES * PAGE),
                  NUM_PAGES, drafter=drafter, max_spec_tokens=3 if drafts else 0, pause_policy=RandomPauses(rng),
                  eos_ids=(EOS,))
    eng = FakeEngine(s, rng, pipelined)
    made = []
    for kind, a, b, n in ops:
        if kind == "add":
            prompt = rng.integers(0, 4, a).tolist()
            params = SamplingParams(max_tokens=b, intercept_token_ids=(7,) if a % 2 else ())  # tool calls: 1 in 8
            made.append(eng.add(Request(f"r{len(made)}", prompt, params, 0, 0.0, len(made)), n))
        elif kind == "step":
            for _ in range(a):
                eng.step()
        elif kind == "resume" and s.paused:
            eng.resume(s.paused[a % len(s.paused)], rng.integers(0, 8, b).tolist())
        elif kind == "abort" and made:
            for req in made[a % len(made)]:  # abort every sample of the request
                if req.request_id in eng.live:
                    eng.abort(req)
        _check_invariants(s)
    idle = 0
    for _ in range(10_000):  # (a livelock fails here rather than hanging)
        if not eng.live:
            break
        plan = eng.step()
        _check_invariants(s)
        if s.paused and not plan.seqs:  # their tools return (past max_model_len: aborted instead)
            for req in list(s.paused):
                if len(req.all_ids) + 2 + req.params.max_tokens <= NUM_PAGES * PAGE:
                    eng.resume(req, [5, 6])
                else:
                    eng.abort(req)
            continue
        idle = 0 if plan.seqs or plan.swap_in else idle + 1  # (a restore's chunks alone are progress)
        assert idle < 2, "scheduler stalled with work left"
    assert not eng.live, "requests never finished"
    eng.step()  # read back the last step
    assert not s.running and not s.waiting and not s.paused
    if s.prefix_cache is not None:
        assert all(n.lock_ref == 0 for n in s.prefix_cache.nodes())
        s.prefix_cache.clear()
    assert s.pool.num_free == NUM_PAGES
    if drafts:
        assert not drafter.live  # every request the drafter heard of ended


def test_pool_rejects_double_free_and_overdraw():
    pool = PagePool(2)
    a = pool.allocate(2)
    with pytest.raises(MemoryError, match="asked for 1 pages, 0 free"):
        pool.allocate(1)
    assert pool.decref(a) == a
    with pytest.raises(AssertionError, match="double free"):
        pool.decref(a[:1])


def test_prefix_cache_evicts_least_recently_used_leaf_first():
    pool = PagePool(8)
    cache = PrefixCache(pool, page_size=2)
    old, new = pool.allocate(2), pool.allocate(2)
    cache.insert([1, 2, 3, 4], old)
    cache.insert([5, 6, 7, 8], new)
    pool.decref(old + new)  # the requests finish; the tree keeps the pages
    cache.match([5, 6, 7, 8])  # touch the second branch
    assert cache.evict(1) == 1 and pool.refcount(old[1]) == 0 and pool.refcount(new[1]) == 1
    pages, node = cache.match([5, 6, 7, 8, 9])
    cache.lock(node)
    assert cache.evict(10) == 1  # the rest of the first branch; the locked branch stays
    assert pool.refcount(old[0]) == 0
    assert cache.match([5, 6, 7, 8])[0] == new


class _PagePerNode:
    """The prefix cache as a tree of one page per node, LRU over leaves, written plainly: the
    model the run-length tree must free exactly like."""

    def __init__(self, page_size):
        self.ps, self.nodes, self.clock = page_size, {}, 0  # path tuple -> [last_access, locks]

    def _paths(self, tokens):
        return [tuple(tokens[:i + self.ps]) for i in range(0, len(tokens) - self.ps + 1, self.ps)]

    def touch(self, tokens, insert):
        self.clock += 1
        out = 0
        for path in self._paths(tokens):
            if path not in self.nodes:
                if not insert:
                    break
                self.nodes[path] = [0, 0]
            self.nodes[path][0] = self.clock
            out += 1
        return out

    def evict(self, num_pages, locked):
        gone = []
        while len(gone) < num_pages:
            leaves = [p for p in self.nodes if p not in locked
                      and not any(len(q) == len(p) + self.ps and q[:len(p)] == p for q in self.nodes)]
            if not leaves:
                break
            victim = min(leaves, key=lambda p: self.nodes[p][0])
            del self.nodes[victim]
            gone.append(victim)
        return gone


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["insert", "match", "evict", "lock"]),
                          st.lists(st.integers(0, 2), max_size=12), st.integers(1, 4)), max_size=40))
def test_run_length_prefix_cache_frees_like_one_page_per_node(ops):
    """Random inserts, matches, locks and evictions over a small alphabet (many shared and
    split edges): the pages matched, the pages evicted (in order) and what the eviction log
    says is gone equal those of a tree of one page per node."""
    import jinfer.prefix_cache as pc
    ps, pool = 2, PagePool(64)
    cache, model, log = PrefixCache(pool, ps), _PagePerNode(ps), None
    log = pc.EvictionLog(cache)
    evicted = []  # the page paths the cache evicts, in order
    def on_evict(node, n):
        tokens = cache.tokens_to(node)
        evicted.extend(tokens[:len(tokens) - k * ps] for k in range(n))
        log.record(node, n)
    cache.on_evict = on_evict
    ticks = iter(range(1, 10_000))  # one distinct time per call, as the model's clock
    real_time, pc.time = pc.time, type("Clock", (), {"monotonic": staticmethod(lambda: float(next(ticks)))})
    locked, locks = set(), []
    try:
        for op, tokens, n in ops:
            if op == "insert" and pool.num_free >= len(tokens) // ps:
                pages = pool.allocate(len(tokens) // ps)
                cache.insert(tokens, pages)
                pool.decref(pages)  # the tree holds them alone
                model.touch(tokens, insert=True)
            elif op in ("match", "lock"):
                pages, node = cache.match(tokens, max_pages=n)
                assert len(pages) == min(model.touch(tokens, insert=False), n)
                assert cache.tokens_to(node) == tuple(tokens[:len(pages) * ps])
                if op == "lock":
                    cache.lock(node)
                    locks.append(node)
                    locked |= set(model._paths(tokens[:len(pages) * ps]))
            elif op == "evict":
                before = len(evicted)
                assert cache.evict(n) == len(want := model.evict(n, locked))
                assert evicted[before:] == want
            cache.check()
            assert cache.num_pages == len(model.nodes) == pool.num_pages - pool.num_free
        gone = {tokens[:k] for tokens, keep in log.drain() for k in range(keep + ps, len(tokens) + 1, ps)}
        assert gone == set(evicted)
        for node in locks:
            cache.unlock(node)
        assert cache.clear() == len(model.nodes) and pool.num_free == pool.num_pages
    finally:
        pc.time = real_time
