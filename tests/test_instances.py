"""Instances: engine replicas on disjoint device groups (8 fake CPU devices), and regrouping
them while requests run."""

import pytest

from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.instances import Instances
from jinfer.models.llama import init_model
from sharding.devices import partition_devices
from tests.test_tp import CFG, GREEDY, PROMPTS, TOK

KW = dict(cache_config=CacheConfig(page_size=4, num_pages=64),
          scheduler_config=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4, max_model_len=64))


def _ids(mesh):
    return [d.id for d in mesh.devices.flat]


def _finish(engine, ids):
    out = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.token_ids
    return [out[i] for i in ids]


@pytest.mark.multi_device
def test_partition_devices_and_errors():
    assert [_ids(m) for m in partition_devices([4, 2, 1, 1])] == [[0, 1, 2, 3], [4, 5], [6], [7]]
    assert [m.size for m in partition_devices([2] * 4)] == [2, 2, 2, 2]
    with pytest.raises(ValueError, match=r"sizes \[4, 4, 2\] need 10 devices, 8 available"):
        partition_devices([4, 4, 2])
    with pytest.raises(ValueError, match="instance size 0 must be a positive integer"):
        partition_devices([4, 0])
    with pytest.raises(ValueError, match="sizes is empty"):
        partition_devices([])
    with pytest.raises(ValueError, match="tp=3 does not divide num_heads=8"):
        Instances(init_model(CFG, seed=3), TOK, [3, 1], **KW)


@pytest.mark.slow  # the default run regroups under load in tests/test_adaptive_tp.py and the
# instances_and_resharding notebook (bytes against the minimum, outputs unchanged)
def test_mixed_instances_regroup_while_requests_run():
    from tests.test_tp import _run
    expected = _run(CFG, None)[1]  # one device, no instances
    inst = Instances(init_model(CFG, seed=3), TOK, [4, 2, 1, 1], **KW)
    assert [_ids(e.runner.layout.mesh) for e in inst.engines] == [[0, 1, 2, 3], [4, 5], [6], [7]]
    # Every replica serves on its own group and gives the single-device tokens.
    assert [o.token_ids for o in inst.engines[3].generate(PROMPTS, GREEDY)] == expected
    ids = {k: [inst.engines[k].add_request(p, GREEDY) for p in PROMPTS] for k in (0, 1)}
    for _ in range(3):
        for k in (0, 1):
            inst.engines[k].step()
    busy0, busy1 = inst.engines[0], inst.engines[1]

    # 4+2+1+1 -> 4+4: the busy TP2 instance grows onto devices 4-7, the idle TP1 ones go.
    report = inst.regroup([4, 4])
    assert report.kept == {0: 0, 1: 1} and report.dropped == [2, 3] and report.created == {}
    assert inst.engines == [busy0, busy1] and _ids(inst.engines[1].runner.layout.mesh) == [4, 5, 6, 7]
    assert report.weights[0].moved == 0 and report.weights[1].moved == report.weights[1].minimum > 0

    # 4+4 -> 2+2+2+2: busy instances shrink onto the half they overlap; new replicas on the other
    # halves copy only what those devices lack (each holds a quarter of a split weight already).
    inst.engines[0].step()
    report = inst.regroup([2, 2, 2, 2])
    assert report.kept == {0: 0, 1: 2} and report.created == {1: 0, 3: 1}
    assert [_ids(e.runner.layout.mesh) for e in inst.engines] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    for j in (1, 3):
        w = report.weights[j]
        assert w.moved == w.minimum and 0 < w.moved < w.full_reload
    assert _finish(inst.engines[0], ids[0]) == expected
    assert _finish(inst.engines[2], ids[1]) == expected
    assert [o.token_ids for o in inst.engines[3].generate(PROMPTS, GREEDY)] == expected
    for e in inst.engines:
        e.scheduler.prefix_cache.clear()
        assert e.scheduler.pool.num_free == e.runner.num_pages  # no page leaked


def _collect(engine, ids, got):
    """Steps `engine` until it has nothing left; records every finished sample's tokens."""
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                got[(o.request_id, o.index)] = o.token_ids
    for _ in range(2):
        for o in engine.step():
            if o.finished:
                got[(o.request_id, o.index)] = o.token_ids
    return [[got[(i, k)] for k in range(n)] for i, n in ids]


@pytest.mark.slow  # tests/test_adaptive_tp.py regroups 2+2+2+2 -> 8 under load in the default run
def test_busy_instances_merge_into_one_and_their_requests_continue_token_identically():
    from jinfer.engine import Engine
    from jinfer.sampling_params import SamplingParams
    from tests.test_tp import _run
    sampled = SamplingParams(temperature=0.9, top_k=20, seed=11, n=2, max_tokens=10, ignore_eos=True)
    ref = Engine(init_model(CFG, seed=3), TOK, **KW)
    want = {}
    rids = [(ref.add_request(p, GREEDY), 1) for p in PROMPTS] + [(ref.add_request(PROMPTS[0], sampled), 2)]
    expected = _collect(ref, rids, want)
    assert expected[:3] == [[t] for t in _run(CFG, None)[1]]

    inst = Instances(init_model(CFG, seed=3), TOK, [2, 2, 2, 2], **KW)
    ids = {k: [(inst.engines[k].add_request(p, GREEDY), 1) for p in PROMPTS]
           + [(inst.engines[k].add_request(PROMPTS[0], sampled), 2)] for k in range(4)}
    for k in range(4):  # every instance mid-way: prompts computed, some tokens out, a step in flight
        for _ in range(2 + k):
            inst.engines[k].step()
    early: dict = {}
    report = inst.regroup([8])
    assert report.kept == {0: 0} and report.dropped == [1, 2, 3]
    assert {i: (j, n) for i, (j, n, _) in report.migrated.items()} == {1: (0, 4), 2: (0, 4), 3: (0, 4)}
    for i, (_, _, kv) in report.migrated.items():
        assert kv.moved > 0 and kv.moved == kv.minimum  # each device got only the heads it lacks
    merged = inst.engines[0]
    assert len(merged.unfinished_ids()) == 16
    results = _collect(merged, [r for k in range(4) for r in ids[k]], early)
    for k in range(4):
        assert results[4 * k:4 * k + 4] == expected
    merged.scheduler.prefix_cache.clear()
    assert merged.scheduler.pool.num_free == merged.runner.num_pages


def test_a_migration_the_pool_cannot_hold_recomputes_and_still_matches():
    from jinfer.engine import Engine
    ref = Engine(init_model(CFG, seed=3), TOK, **KW)
    expected = [o.token_ids for o in ref.generate(PROMPTS, GREEDY)]
    src = Engine(init_model(CFG, seed=3), TOK, **KW)
    small = dict(KW, cache_config=CacheConfig(page_size=4, num_pages=12))
    dst = Engine(init_model(CFG, seed=3), TOK, **small)
    ids = [src.add_request(p, GREEDY) for p in PROMPTS]
    for _ in range(4):
        src.step()
    migration = src.export_requests()
    assert not src.has_unfinished() and migration.num_pages > 12 - 4
    with pytest.raises(ValueError, match="not unfinished in this engine"):
        src.export_requests(["nope"])
    dst.import_requests(migration)
    assert any(r.num_preemptions for i in dst.unfinished_ids() for r in dst.samples(i))  # some had no room: recompute
    with pytest.raises(ValueError, match="already in use in this engine"):
        dst.import_requests(migration)
    assert _collect(dst, [(i, 1) for i in ids], {}) == [[t] for t in expected]
    dst.scheduler.prefix_cache.clear()
    assert dst.scheduler.pool.num_free == 12


def test_exporting_while_the_step_in_flight_finishes_a_request_keeps_its_output():
    from jinfer.engine import Engine
    from jinfer.sampling_params import SamplingParams

    src = Engine(init_model(CFG, seed=3), TOK, **KW)
    dst = Engine(init_model(CFG, seed=3), TOK, **KW)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    short, long = src.add_request(PROMPTS[1], one), src.add_request(PROMPTS[0], GREEDY)
    assert src.step() == [] and src.step_in_flight  # the step that finishes `short` is in flight
    migration = src.export_requests()  # reads it back: `short` travels as its final output only
    assert list(migration.groups) == [long] and not src.has_unfinished()
    dst.import_requests(migration)
    got = {}
    while dst.has_unfinished():
        for o in dst.step():
            if o.finished:
                got[o.request_id] = o.token_ids
    ref = Engine(init_model(CFG, seed=3), TOK, **KW)
    assert got == {short: ref.generate([PROMPTS[1]], [one])[0].token_ids,
                   long: ref.generate([PROMPTS[0]], [GREEDY])[0].token_ids}


@pytest.mark.multi_device
def test_precompile_keeps_programs_for_later_regroups(caplog):
    import dataclasses
    import logging

    from jinfer.config import EngineOptions
    from tests.test_tp import _run

    # A max_model_len no other test uses (13 pages per sequence): every step program here is new
    # to the session's compilation cache.
    kw = dict(KW, options=EngineOptions(warmup=True),
              scheduler_config=dataclasses.replace(KW["scheduler_config"], max_model_len=52))
    inst = Instances(init_model(CFG, seed=3), TOK, [4, 4], **kw)
    per_group = len(inst.engines[0].runner.bucket_keys())
    with pytest.raises(ValueError, match="degree 3 does not divide the 8 devices"):
        inst.precompile([3])
    assert len(inst.programs) == 2 * per_group  # the two tp4 instances' own
    assert inst.precompile([8, 4]) == per_group  # devices 0-7; the tp4 groups are in use
    assert len(inst.programs) == 3 * per_group
    caplog.set_level(logging.DEBUG, logger="jax._src.compiler")

    def step_compiles():
        """Step programs compiled or read back from the persistent cache since the last call."""
        seen = [r for r in caplog.records if "for 'jit__step'" in r.getMessage()]
        caplog.clear()
        return len(seen)

    caplog.clear()
    hits = inst.programs.hits
    inst.regroup([8])  # the resharded engine takes precompile's programs as they are
    assert step_compiles() == 0 and inst.programs.hits == hits + per_group
    inst.regroup([4, 2, 2])  # devices 0-3 as at the start (kept); the tp2 groups compile their steps
    assert step_compiles() == 2 * per_group
    assert len(inst.programs) == 5 * per_group
    assert [o.token_ids for o in inst.engines[2].generate(PROMPTS, GREEDY)] == _run(CFG, None)[1]
    # The bench's measurement of regroups under load: every partition of the cycle, requests
    # running (then aborted), no program compiled, every page back.
    from jinfer.instances import InstanceGroup
    from scheduler.adaptive_tp.live import measure_regroups

    group = InstanceGroup(inst)
    step_compiles()  # (the single-device reference above compiled its own)
    records = measure_regroups(group, [[8], [4, 2, 2]], PROMPTS * 2, steps_between=2, max_tokens=16)
    assert [(r.old, r.new) for r in records] == [((4, 2, 2), (8,)), ((8,), (4, 2, 2))]
    assert all(r.seconds > 0 for r in records) and records[1].requests_migrated + records[0].requests_migrated > 0
    assert step_compiles() == 0 and not any(e.has_unfinished() for e in group.engines)
    assert all(e.load().free_pages + e.load().cached_pages == e.load().num_pages for e in group.engines)


@pytest.mark.multi_device
def test_precompile_leaves_the_instances_background_warm_up_running():
    import dataclasses

    from jinfer.config import EngineOptions

    kw = dict(KW, options=EngineOptions(warmup=True, warmup_background=True, min_token_bucket=4),
              scheduler_config=dataclasses.replace(KW["scheduler_config"], max_model_len=52))
    inst = Instances(init_model(CFG, seed=3), TOK, [4, 4], **kw)
    inst.precompile([8])  # (its shadow runner once stopped engine 0's held warm-up for good)
    for engine in inst.engines:
        engine.release_warmup()
        assert engine.runner.wait_warmup(300)
        assert engine.runner.ready_tokens() == engine.runner.token_buckets[-1]
