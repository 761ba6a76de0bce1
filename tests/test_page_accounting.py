"""Property tests: random add/step/abort sequences never leak, double-free or go negative."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.page_pool import PagePool
from jinfer.prefix_cache import PrefixCache
from jinfer.request import Request
from jinfer.sampling_params import SamplingParams
from jinfer.scheduling import Scheduler

PAGE = 4
NUM_PAGES = 24


def _check_invariants(s: Scheduler):
    refs = [s.pool.refcount(p) for p in range(NUM_PAGES)]
    assert min(refs) >= 0
    expected = [0] * NUM_PAGES
    for req in s.running + s.waiting:
        for p in req.pages:
            expected[p] += 1
    if s.prefix_cache is not None:
        for node in s.prefix_cache._nodes():
            expected[node.page] += 1
            assert node.lock_ref >= 0
    assert refs == expected, "refcounts disagree with holders"
    assert s.pool.num_free == expected.count(0)


def _fake_step(s: Scheduler, rng):
    """Mechanism-only step: what Engine._postprocess does, with random tokens in place of a model."""
    plan = s.schedule()
    by_id = {r.request_id: r for r in s.running}
    for seq in plan.seqs:
        req = by_id[seq.request_id]
        req.num_computed_tokens += len(seq.token_ids)
        if seq.sample:
            if len(seq.token_ids) > 1:
                s.on_prefill_done(req)
            req.output_ids.append(int(rng.integers(0, 8)))  # tiny vocab: many shared prefixes
            if len(req.output_ids) >= req.params.max_tokens:
                s.finish(req)
    return plan


ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 30), st.integers(1, 12)),
    st.tuples(st.just("step"), st.integers(1, 3), st.just(0)),
    st.tuples(st.just("abort"), st.integers(0, 50), st.just(0)),
), min_size=1, max_size=40)


@pytest.mark.parametrize("prefix", [True, False])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, seed=st.integers(0, 2**16))
def test_random_add_step_abort_keeps_pages_consistent(prefix, ops, seed):
    rng = np.random.default_rng(seed)
    s = Scheduler(CacheConfig(page_size=PAGE, num_pages=NUM_PAGES, enable_prefix_cache=prefix),
                  SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4, max_model_len=NUM_PAGES * PAGE),
                  NUM_PAGES)
    made = []
    for kind, a, b in ops:
        if kind == "add":
            prompt = rng.integers(0, 4, a).tolist()
            req = Request(f"r{len(made)}", prompt, SamplingParams(max_tokens=b), 0, 0.0, len(made))
            made.append(req)
            s.add(req)
        elif kind == "step":
            for _ in range(a):
                _fake_step(s, rng)
        elif made:
            req = made[a % len(made)]
            if req in s.running or req in s.waiting:
                s.finish(req)
        _check_invariants(s)
    while s.running or s.waiting:
        plan = _fake_step(s, rng)
        _check_invariants(s)
        assert plan.seqs, "scheduler stalled with work left"
    if s.prefix_cache is not None:
        assert all(n.lock_ref == 0 for n in s.prefix_cache._nodes())
        s.prefix_cache.clear()
    assert s.pool.num_free == NUM_PAGES


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
