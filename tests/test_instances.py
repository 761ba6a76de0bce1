"""Instances: engine replicas on disjoint device groups (8 fake CPU devices), and regrouping
them while requests run."""

import pytest

from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.models.llama import init_model
from jinfer.instances import Instances
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

    with pytest.raises(ValueError, match="drops instance 1 .tp=2., which has unfinished requests"):
        inst.regroup([8])
    assert inst.sizes == [4, 2, 1, 1]  # nothing moved

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
