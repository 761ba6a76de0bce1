"""Preble routing: the global radix tree, E2 and the baselines, the local priority groups, the
cost model, the paper workloads and the simulator."""

import collections
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.prefix_cache import EvictionLog
from jinfer.request import Request
from jinfer.sampling_params import SamplingParams
from jinfer.scheduling import Scheduler
from scheduler.cost_model import CostModel, analytic_7b_h100
from scheduler.routing import preble_workloads as pw
from scheduler.routing.policies import (ROUTERS, E2Options, LeastLoad, NoReplicaUp, PrebleE2, ReplicaLoad, RoundRobin,
                                        RouteRequest, SGLangCacheAware, make_router)
from scheduler.routing.radix import GlobalRadixTree
from scheduler.simulation.simulator import ReplicaConfig, Simulator
from scheduler.slo.priority_groups import PriorityGroups

# -- global radix tree -------------------------------------------------------------------------

seqs = st.lists(st.integers(0, 2), min_size=1, max_size=7).map(tuple)
ops = st.lists(st.one_of(
    st.tuples(st.just("insert"), seqs, st.integers(0, 2)),
    st.tuples(st.just("evict"), seqs, st.integers(0, 6), st.integers(0, 2)),
    st.tuples(st.just("drop"), st.integers(0, 2)),
    st.tuples(st.just("prune"))), max_size=40)


@settings(max_examples=150, deadline=None)
@given(ops, st.lists(seqs, min_size=1, max_size=5))
def test_tree_matches_a_set_of_cached_prefixes_per_replica(operations, queries):
    tree = GlobalRadixTree(window_s=10.0)
    model = collections.defaultdict(set)  # replica -> every cached prefix
    now = 0.0
    for op in operations:
        now += 1.0
        if op[0] == "insert":
            _, seq, r = op
            tree.insert(seq, r, now)
            model[r] |= {seq[:i] for i in range(1, len(seq) + 1)}
        elif op[0] == "evict":
            _, seq, keep, r = op
            keep = min(keep, len(seq))
            dropped = tree.evict(seq, keep, r)
            gone = {p for p in model[r] if len(p) > keep and p[:keep + 1] == seq[:keep + 1]} if keep < len(seq) else set()
            assert dropped == len(gone & model[r])
            model[r] -= gone
        elif op[0] == "drop":
            assert tree.drop_replica(op[1]) == len(model[op[1]])
            assert not any(op[1] in n.cached_on or op[1] in n.hits for n in tree.nodes())
            model[op[1]] = set()
        else:
            tree.prune(now + 100.0)  # every hit is out of the window: only cached nodes survive
        tree.check()
    for q in queries + [p for ps in model.values() for p in ps][:10]:
        got = tree.cached_lengths(q, range(3))
        for r in range(3):
            want = max((len(p) for p in model[r] if q[:len(p)] == p), default=0)
            assert got[r] == want, (q, r)
    for r in range(3):
        # Shared prefixes counted once: the number of distinct cached prefixes is the token count.
        assert tree.tokens_on[r] == len(model[r]) == tree.cached_tokens(r)


def test_tree_window_hits_expire_and_prune_drops_uncached_nodes():
    tree = GlobalRadixTree(window_s=5.0)
    path = tree.insert((1, 2, 3), 0, now=0.0)
    tree.insert((1, 2, 4), 0, now=3.0)
    top = tree.match((1, 2))[0][0]
    assert top.window_hits(0, 4.0, 5.0) == 2 and top.window_hits(0, 7.0, 5.0) == 1
    tree.evict((1, 2, 3), 0, 0)
    assert tree.cached_lengths((1, 2, 3), [0]) == {0: 0}
    assert tree.prune(now=20.0) == 3 and not tree.root.children and path


# -- E2 hand cases -------------------------------------------------------------------------------

COST = CostModel("unit", fixed_s=0.0, per_token_s=1e-3, per_attn_s=0.0, per_kv_s=0.0, per_seq_s=0.0)
PLAIN = E2Options(rebalance=False, replicate=False, pd_balance=False)


def _req(i, prompt, out=1):
    return RouteRequest(f"r{i}", tuple(prompt), out)


def test_e2_exploits_only_when_cached_tokens_exceed_missed_ones():
    e2 = PrebleE2(2, COST, capacity_tokens=10_000, options=PLAIN)
    assert e2.describe() == dataclasses.asdict(PLAIN)  # what the live router reports
    shared = tuple(range(100, 160))
    assert e2.route(_req(0, shared), now=0.0) == 0  # empty: explore, lowest index on a tie
    for i in range(1, 4):  # load replica 0 with unrelated work so explore would pick replica 1
        assert e2.route(_req(i, tuple(range(1000 * i, 1000 * i + 10))), now=0.0) in (0, 1)
    e2.route(_req(9, tuple(range(5000, 5400))), now=0.0)  # a big request lands somewhere
    heavy = 0 if e2.load(0, 0.0) > e2.load(1, 0.0) else 1
    light = 1 - heavy
    e2.tree.evict(shared, 0, light)
    e2.tree.insert(shared, heavy, now=0.0, record_hit=False)
    # 60 cached on `heavy`, 59 missed: exploit the heavy replica.
    assert e2.route(_req(10, shared + tuple(range(7000, 7059))), now=1.0) == heavy
    assert e2.decisions["exploit"] == 1
    # 60 cached, 60 missed: not more cached than missed, so explore: the lighter replica.
    assert e2.route(_req(11, shared + tuple(range(8000, 8060))), now=1.0) == light


def test_e2_explore_avoids_evicting_a_hot_prefix():
    e2 = PrebleE2(2, COST, capacity_tokens=300, options=PLAIN)
    hot, cold = tuple(range(1, 201)), tuple(range(1001, 1201))
    e2.tree.insert(hot, 0, now=0.0)
    for t in range(1, 6):
        e2.tree.insert(hot, 0, now=float(t))  # five more uses within the window
    e2.tree.insert(cold, 1, now=0.0)
    # Equal loads (none recorded); a 200-token miss needs 100 tokens evicted on either replica.
    assert e2.route(_req(0, tuple(range(5000, 5200))), now=10.0) == 1


def test_e2_eviction_cost_follows_the_replicas_load_reports():
    e2 = PrebleE2(2, COST, capacity_tokens=100_000, options=PLAIN)
    hot = tuple(range(1, 201))
    for t in range(6):
        e2.tree.insert(hot, 0, now=float(t))
    miss = _req(0, tuple(range(5000, 5200)))
    assert e2.free_tokens(0) == 100_000 - 200 and e2._eviction_cost(0, 216, 10.0) == 0
    # Replica 0 reports its pool full (running requests hold what the tree does not show):
    # admitting the miss there would evict the hot prefix, so it goes to replica 1.
    e2.on_load(0, ReplicaLoad(waiting=0, running=3, num_pages=6250, free_pages=0, cached_pages=13, page_size=16), 10.0)
    e2.on_load(1, ReplicaLoad(waiting=0, running=0, num_pages=6250, free_pages=6250, cached_pages=0, page_size=16), 10.0)
    assert e2.free_tokens(0) == 0 and e2._eviction_cost(0, 216, 10.0) > 0
    assert e2.route(miss, now=10.0) == 1
    # Until the next report, what was routed there counts against the reported room.
    assert e2.free_tokens(1) == 6250 * 16 - 201  # its 200-token prompt + 1 output token
    e2.on_load(1, ReplicaLoad(0, 1, 6250, 6237, 0, 16), 10.5)
    assert e2.free_tokens(1) == 6237 * 16


def test_e2_rebalances_away_from_an_overloaded_holder():
    e2 = PrebleE2(2, COST, capacity_tokens=100_000, options=E2Options(replicate=False, pd_balance=False))
    shared = tuple(range(1, 101))
    e2.tree.insert(shared, 0, now=0.0, record_hit=False)
    e2.route(_req(0, tuple(range(10_000, 12_000))), now=0.0)  # replica 0 (ties to lowest): heavy
    assert e2.load(0, 0.0) > 1.5 * e2.load(1, 0.0)
    assert e2.route(_req(1, shared + (7,)), now=0.0) == 1
    assert e2.decisions["rebalance"] == 1


def test_e2_replicates_a_prefix_whose_ttft_doubled():
    e2 = PrebleE2(2, COST, capacity_tokens=100_000, options=E2Options(rebalance=False, pd_balance=False))
    shared = tuple(range(1, 101))
    routed = []
    for i in range(9):
        r = e2.route(_req(i, shared + (1000 + i,)), now=float(i))
        routed.append(r)
        e2.on_first_token(r, _req(i, ()), now=float(i), ttft_s=0.1 if i < 4 else 0.5)
    assert routed[0] == routed[1] == routed[4]  # exploit the first holder while TTFT is flat
    assert e2.decisions["replicate"] >= 1 and set(routed) == {0, 1}


def test_baselines():
    rr = RoundRobin(3)
    assert [rr.route(_req(i, (1,)), 0.0) for i in range(4)] == [0, 1, 2, 0]
    ll = LeastLoad(2)
    assert [ll.route(_req(i, (1,)), 0.0) for i in range(3)] == [0, 1, 0]
    ll.on_finish(0, None, 1.0)
    ll.on_finish(0, None, 1.0)
    assert ll.route(_req(3, (1,)), 1.0) == 0
    sg = SGLangCacheAware(2, balance_abs=2)
    prefix = tuple(range(50))
    assert sg.route(_req(0, prefix + (1,)), 0.0) == 0
    assert sg.route(_req(1, prefix + (2,)), 0.0) == 0  # match rate 50/51 > 0.3
    assert sg.route(_req(2, (9, 9, 9)), 0.0) == 1  # no match: least load
    sg.outstanding = [5, 1]  # imbalanced: 5 - 1 > 2 and 5 > 1.5
    assert sg.route(_req(3, prefix + (3,)), 0.0) == 1


@pytest.mark.parametrize("name", ROUTERS)
def test_routers_skip_a_down_replica_and_take_it_back_cold(name):
    router = make_router(name, 3, COST, capacity_tokens=10_000, options=PLAIN)
    shared = tuple(range(100, 160))
    held = router.route(_req(0, shared + (1,)), now=0.0)
    for i in range(1, 6):
        router.route(_req(i, shared + (1 + i,) if i % 2 else tuple(range(1000 * i, 1000 * i + 30))), now=0.0)
    router.on_load(held, ReplicaLoad(0, 2, 100, 50, 10, 16), now=0.0)
    router.on_replica_down(held, now=1.0)
    assert router.outstanding[held] == 0 and router.reported[held] is None
    tree = getattr(router, "tree", None)
    if tree is not None:  # the tree forgets it: nothing cached there, no window hits
        assert tree.tokens_on[held] == 0 and tree.cached_lengths(shared, [held]) == {held: 0}
        assert not any(held in n.cached_on or held in n.hits for n in tree.nodes())
        tree.check()
    routed = [router.route(_req(10 + i, shared + (50 + i,) if i % 2 else (7, 7, i)), now=1.0) for i in range(12)]
    assert held not in routed and set(routed) == {0, 1, 2} - {held}
    for r in {0, 1, 2} - {held}:
        router.on_replica_down(r, now=2.0)
    with pytest.raises(NoReplicaUp, match="all 3 replicas are down"):
        router.route(_req(30, shared), now=2.0)
    router.on_replica_up(held, now=3.0)
    assert router.route(_req(31, shared + (9,)), now=3.0) == held  # the only one up
    for r in range(3):
        router.on_replica_up(r, now=3.0)
    fresh = [tuple(range(9000 + 100 * i, 9030 + 100 * i)) for i in range(6)]
    assert held in {router.route(_req(40 + i, p), now=3.0) for i, p in enumerate(fresh)}


def test_e2_takes_a_replica_back_with_no_load_and_the_prefix_it_held_forgotten():
    e2 = PrebleE2(2, COST, capacity_tokens=10_000, options=PLAIN)
    shared = tuple(range(100, 160))
    assert e2.route(_req(0, shared + (1,)), now=0.0) == 0
    assert e2.route(_req(1, shared + (2,)), now=0.0) == 0  # exploit: 60 cached > 1 missed
    assert e2.route(_req(2, tuple(range(2000, 2100))), now=0.0) == 1  # replica 0 is the loaded one
    e2.on_load(0, ReplicaLoad(0, 2, 625, 0, 0, 16), now=0.0)
    e2.on_replica_down(0, now=1.0)
    assert e2.load(0, 1.0) == 0 and e2.free_tokens(0) == 10_000  # cold: no history, no report
    assert e2.route(_req(3, shared + (3,)), now=1.0) == 1  # the prefix's only holder is down
    e2.on_replica_up(0, now=2.0)
    # Back, and lighter than replica 1, the prefix now lives on 1 only: 61 cached > 1 missed.
    assert e2.route(_req(4, shared + (3, 4)), now=2.0) == 1 and e2.decisions["exploit"] == 2
    assert e2.route(_req(5, tuple(range(3000, 3050))), now=2.0) == 0  # explore: the idle replica


# -- local priority groups ---------------------------------------------------------------------


def test_priority_groups_favour_cache_hits_in_proportion():
    sched = Scheduler(CacheConfig(page_size=4, num_pages=64), SchedulerConfig(64, 8, 128), 64,
                      policy=(pg := PriorityGroups()))
    pg.bind(sched)
    pages = sched.pool.allocate(4)
    sched.prefix_cache.insert(list(range(16)), pages)
    params = SamplingParams(max_tokens=1)
    hits = [Request(f"h{i}", list(range(16)) + [100 + i], params, 0, 0.0, i) for i in range(20)]
    miss = [Request(f"m{i}", [500 + i] * 17, params, 0, 0.0, 20 + i) for i in range(20)]
    assert pg.group(hits[0]) == 9 and pg.group(miss[0]) == 0
    order = sorted(miss + hits, key=pg.priority)
    first = [r.request_id[0] for r in order[:22]]
    assert first.count("h") == 20 and first.count("m") == 2  # weight 10 vs 1


# -- cost model --------------------------------------------------------------------------------


def test_cost_model_fit_recovers_coefficients():
    true = analytic_7b_h100()
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(60):
        seqs = [(int(rng.integers(1, 300)), int(rng.integers(0, 3000))) for _ in range(int(rng.integers(1, 9)))]
        samples.append((seqs, true.step_time(seqs) * (1 + 0.01 * rng.standard_normal())))
    fitted = CostModel.fit(samples, "fit")
    assert fitted.relative_error(samples) < 0.02
    assert fitted.fixed_s == pytest.approx(true.fixed_s, rel=0.1)
    assert fitted.per_token_s == pytest.approx(true.per_token_s, rel=0.1)
    assert CostModel.fit([([(1, 0)], 1.0), ([(2, 0)], 0.5)], "neg").per_token_s == 0  # never negative


# -- workloads -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(pw.SPECS))
def test_paper_workloads_have_their_statistics(name):
    spec = pw.SPECS[name]
    scale = 8.0
    items = pw.generate(name, 3000, rate=10.0, scale=scale, seed=1)
    lengths = np.array([len(it.prompt) for it in items])
    outs = np.array([it.max_tokens for it in items])
    assert lengths.mean() == pytest.approx(spec.prompt_mean / scale, rel=0.12)
    assert outs.mean() == pytest.approx(max(1.0, spec.output_mean / scale), rel=0.2, abs=1.0)
    groups = collections.Counter(it.group for it in items)
    assert 3000 / len(groups) == pytest.approx(spec.requests_per_key, rel=0.25)
    shared = np.mean([len(next(iter({it.prompt for it in items if it.group == g}))) for g in list(groups)[:1]])
    assert shared > 0
    (g, _), = groups.most_common(1)
    members = [it.prompt for it in items if it.group == g]
    common = next(i for i in range(min(map(len, members)) + 1)
                  if i == min(map(len, members)) or len({m[i] for m in members}) > 1)
    assert common / np.mean([len(m) for m in members]) == pytest.approx(spec.shared_fraction, abs=0.15)
    assert (3000 - 1) / items[-1].arrival_s == pytest.approx(10.0, rel=0.1)


# -- simulator ---------------------------------------------------------------------------------


def _sim(router_name, items, fast_forward=True, **cfg):
    from scheduler.routing.policies import make_router
    rc = ReplicaConfig(page_size=16, num_pages=cfg.pop("num_pages", 2000), **cfg)
    return Simulator(make_router(router_name, 3, analytic_7b_h100(), rc.capacity_tokens), 3, analytic_7b_h100(),
                     rc, fast_forward=fast_forward).run(items)


def _key(res):
    return [(r.replica, r.cached_tokens, r.output_tokens) for r in res.records]


def _same_times(a, b):
    return all(abs(x.first_token_s - y.first_token_s) < 1e-9 and abs(x.finish_s - y.finish_s) < 1e-9
               for x, y in zip(a.records, b.records))


@pytest.mark.parametrize("router", ["round-robin", "preble-e2"])
def test_simulator_is_deterministic_and_fast_forward_changes_nothing(router):
    items = pw.generate("toolbench", 300, rate=60.0, scale=4.0, seed=3)
    a, b = _sim(router, items), _sim(router, items)
    assert _key(a) == _key(b) and _same_times(a, b)
    slow = _sim(router, items, fast_forward=False)
    assert _key(slow) == _key(a) and _same_times(slow, a) and slow.steps == a.steps
    st_ = a.stats()
    assert st_["completed"] == 300 and st_["cache_hit_rate"] > 0.5
    assert all(r.output_tokens == it.max_tokens for r, it in zip(a.records, items))


def test_fast_forward_writes_recorded_outputs_as_step_by_step_does():
    """Work items with recorded outputs, whose second turns extend the first turns' prompt and
    output: a fast-forwarded stretch appends the recorded tokens, so the second turns hit the
    prefix cache and every record equals step-by-step simulation's."""
    from scheduler.simulation.workloads import WorkItem
    rng = np.random.default_rng(1)
    turns = [(tuple(rng.integers(0, 30000, 48).tolist()), tuple(rng.integers(0, 30000, 64).tolist())) for _ in range(6)]
    items = [WorkItem(0.001 * i, p, len(o), output=o) for i, (p, o) in enumerate(turns)]
    items += [WorkItem(5.0 + 0.001 * i, p + o + (7, 8), 16, output=tuple(range(16))) for i, (p, o) in enumerate(turns)]
    fast, slow = _sim("round-robin", items), _sim("round-robin", items, fast_forward=False)
    assert _key(fast) == _key(slow) and _same_times(fast, slow) and fast.steps == slow.steps
    assert [r.output_ids for r in fast.records] == [it.output for it in items]
    assert all(r.cached_tokens >= 96 for r in fast.records[6:])  # the first turn's prompt and output, whole pages


def test_simulator_with_evictions_keeps_the_router_tree_true():
    items = pw.generate("loogle", 120, rate=5.0, scale=16.0, seed=0)
    from scheduler.routing.policies import make_router
    rc = ReplicaConfig(page_size=16, num_pages=400)  # 6400 tokens: constant eviction
    router = make_router("preble-e2", 3, analytic_7b_h100(), rc.capacity_tokens)
    sim = Simulator(router, 3, analytic_7b_h100(), rc)
    res = sim.run(items)
    assert res.stats()["completed"] == 120
    router.tree.check()
    for r, rep in enumerate(sim.replicas):
        cache = rep.sched.prefix_cache
        assert rep.sched.pool.num_free + cache.num_pages == rc.num_pages  # every page back or cached
        assert router.tree.tokens_on[r] <= rc.capacity_tokens
        for it in items:  # evictions were reported: the tree claims at most the replica's pages
            assert router.tree.cached_lengths(it.prompt, [r])[r] < cache.peek(it.prompt) + rc.page_size


def test_simulator_rejects_what_cannot_fit_and_text_prompts():
    from scheduler.simulation.workloads import WorkItem
    res = _sim("round-robin", [WorkItem(0.0, tuple(range(10, 60)), 4), WorkItem(0.0, (1,) * 40_000, 4)], num_pages=100)
    assert res.records[1].error and not res.records[0].error
    with pytest.raises(ValueError, match="token-id prompts"):
        _sim("round-robin", [WorkItem(0.0, "text", 4)])


def test_scheduler_hooks_used_by_the_policy_layer():
    sched = Scheduler(CacheConfig(page_size=4, num_pages=8), SchedulerConfig(16, 4, 64), 8)
    seen = []
    cache = sched.prefix_cache
    cache.on_evict = lambda node, n: (seen.append((cache.tokens_to(node), n)), log.record(node, n))
    log = EvictionLog(cache)
    cache.insert(list(range(8)), sched.pool.allocate(2))
    cache.insert(list(range(4)) + [9] * 4, [0] + sched.pool.allocate(2)[1:])  # a branch after page 0
    assert cache.peek(list(range(10))) == 8 and cache.peek([9]) == 0
    sched.pool.decref(list(range(4)))
    assert cache.evict(1) == 1  # the older branch's page
    assert cache.evict(2) == 2  # the newer branch's page, then the shared first page
    assert seen == [(tuple(range(8)), 1), (tuple(range(4)) + (9,) * 4, 1), (tuple(range(4)), 1)]
    # The second branch, then its parent: one entry; the first is its own.
    assert log.drain() == [(tuple(range(8)), 4), (tuple(range(4)) + (9,) * 4, 0)] and not log
    # a decode plan run 5 times in a row (the simulator's fast-forward): its 5 samples settle at
    # once, with pages for the K/V the later steps wrote; the length rule ends a run early
    req = Request("x", [1, 2, 3], SamplingParams(max_tokens=10, ignore_eos=True), 0, 0.0, 0)
    sched.add(req)
    sched.update(sched.schedule(), [req], [7])  # the prompt, and its first token
    plan = sched.schedule()
    done = sched.update(plan, [req], [[8, 9, 10, 11, 12]], repeats=5)
    assert done[0].tokens == (8, 9, 10, 11, 12) and not done[0].finish_reason
    assert req.output_ids == [7, 8, 9, 10, 11, 12] and req.num_computed_tokens == 8 and len(req.pages) == 2
    done = sched.update(sched.schedule(), [req], [list(range(20, 26))], repeats=6)
    assert done[0].tokens == (20, 21, 22, 23) and done[0].finish_reason == "length"  # 10 tokens: the last 2 dropped
    assert req.output_ids == [7, 8, 9, 10, 11, 12, 20, 21, 22, 23] and req.num_computed_tokens == 12 and not req.pages
    with pytest.raises(ValueError, match="no draft and 3 samples, not 1 tokens, 0 drafted and 2 samples"):
        other = Request("y", [1, 2, 3], SamplingParams(max_tokens=10), 0, 0.0, 1)
        sched.add(other)
        sched.update(sched.schedule(), [other], [5])
        sched.update(sched.schedule(), [other], [[1, 2]], repeats=3)


# -- tools -------------------------------------------------------------------------------------

def _run_tool(name, *args):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, os.path.join(root, "tools", name), *args], capture_output=True,
                          text=True, timeout=300)


def test_profile_engine_fits_a_cost_model_the_simulator_loads(tmp_path):
    import os
    out = tmp_path / "cost.json"
    test_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "test_5m.py")
    proc = _run_tool("profile_engine.py", "--prefill=32,64", "--cached=0", "--batch=1,4", "--context=32",
                     "--repeats=1", f"--config={test_config}", "--config.engine.compilation_cache=", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| prefill 32 after 0 |" in proc.stdout and "| decode x4 at 32 |" in proc.stdout
    model = CostModel.load(str(out))
    assert model.step_time([(64, 0)]) > 0
    proc = _run_tool("simulate_routing.py", "--workloads=embodied", "--num_requests=60", "--rate_factors=1",
                     "--scale=16", f"--cost_model={out}", "--num_pages=400")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| embodied |" in proc.stdout and "Ablation" in proc.stdout and "requests/s" in proc.stdout
    proc = _run_tool("simulate_routing.py", "--workloads=chat")
    assert proc.returncode != 0 and "unknown workloads ['chat']" in proc.stderr


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_simulator_runs_the_engines_speculation(tree):
    """Rollouts of the same problems with their recorded outputs: a suffix drafter in each
    replica drafts later rollouts from earlier ones' outputs, drafts are verified against the
    recorded tokens, every request gets exactly its output, and the run takes fewer steps and
    less simulated time than without speculation (on an H100-like cost model)."""
    from scheduler.simulation.workloads import WorkItem
    from scheduler.speculation.drafters import SuffixConfig, SuffixDrafter
    from scheduler.routing.policies import make_router
    from scheduler.speculation.budget import CostAwareBudget

    rng = np.random.default_rng(0)
    problems = [(tuple(rng.integers(0, 30000, 40).tolist()), tuple(rng.integers(0, 30000, 120).tolist()))
                for _ in range(4)]
    items = [WorkItem(0.5 * epoch + 0.01 * i, prompt, len(out), output=out)
             for epoch in range(4) for i, (prompt, out) in enumerate(problems)]
    rc = ReplicaConfig(page_size=16, num_pages=2000)

    def run(speculation):
        router = make_router("round-robin", 1, analytic_7b_h100(), rc.capacity_tokens)
        return Simulator(router, 1, analytic_7b_h100(), rc, speculation=speculation).run(items)

    finished = {}

    class Recording(SuffixDrafter):
        def finish(self, request_id, output_ids, aborted):
            finished[int(request_id)] = tuple(output_ids)
            super().finish(request_id, output_ids, aborted)

    plain = run(None)
    spec = run(lambda: (Recording(SuffixConfig(tree=tree)), 8, CostAwareBudget()))
    assert [r.output_tokens for r in spec.records] == [len(it.output) for it in items]
    assert [finished[i] for i in range(len(items))] == [it.output for it in items]  # the recorded tokens
    assert spec.steps < plain.steps * 0.7
    assert spec.sim_time_s < plain.sim_time_s


@pytest.mark.parametrize("name", ROUTERS)
def test_a_replica_added_while_routing_gets_requests_once_up(name):
    """add_replica: the next index, down (never routed to) until on_replica_up, then routed to
    like the others; every per-replica list grows with it."""
    router = make_router(name, 2, COST, capacity_tokens=10_000, options=PLAIN)
    assert router.add_replica() == 2 and router.num_replicas == 3
    routed = [router.route(_req(i, (i, i + 1, i + 2)), now=0.0) for i in range(6)]
    assert 2 not in routed
    router.on_replica_up(2, now=1.0)
    router.on_load(2, ReplicaLoad(0, 0, 100, 100, 0, 16), now=1.0)
    routed = [router.route(_req(10 + i, (7, 7, 10 + i)), now=1.0 + i) for i in range(9)]
    assert 2 in routed
    for i, r in enumerate(routed):
        router.on_finish(r, _req(10 + i, (7, 7, 10 + i)), now=20.0)
    assert router.outstanding[2] == 0
