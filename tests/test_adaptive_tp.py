"""Instances behind one engine interface (jinfer.instances.InstanceGroup) with an adaptive-TP
controller (scheduler.adaptive_tp.nitsum) on 8 fake CPU devices: reconfigurations under load leave every
request's tokens unchanged, and one gRPC endpoint serves the group."""

import concurrent.futures

import pytest

from jinfer.config import CacheConfig, SchedulerConfig, ServingConfig, Tier
from jinfer.engine import Engine
from jinfer.instances import InstanceGroup, Instances
from jinfer.models.llama import init_model
from jinfer.sampling_params import SamplingParams
from jinfer.serving.client import Client
from jinfer.serving.server import Server
from scheduler.adaptive_tp.nitsum import Controller, NitsumControl, Partition, Profile
from tests.serving_util import settled
from tests.test_tp import CFG, TOK

pytestmark = pytest.mark.multi_device  # instance groups over the 8 fake devices

KW = dict(cache_config=CacheConfig(page_size=4, num_pages=64),
          scheduler_config=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4, max_model_len=64))
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.9, top_k=20, seed=5, max_tokens=8, n=2, ignore_eos=True)
TIERS = (Tier("interactive", 10.0, 1.0, 4), Tier("batch", 60.0, 5.0, 1))
PROMPTS = [list(range(1, 30)), [7, 8, 9], list(range(1, 20)) + [5], [3] * 11]


class Scripted:
    """A TopologyControl that plays a list of instance sizes, one per window (None: keep), and
    routes each tier to a fixed instance (modulo the count)."""

    window_s = 0.0

    def __init__(self, script):
        self.script, self.windows, self.observed = list(script), 0, []

    def route(self, tier, outstanding):
        return (0 if tier == "interactive" else 1) % len(outstanding)

    def observe(self, arrived, served):
        self.observed.append((dict(arrived), dict(served)))

    def decide(self, now):
        self.windows += 1
        return self.script.pop(0) if self.script else None


@pytest.fixture(scope="module")
def expected():
    ref = Engine(init_model(CFG, seed=3), TOK, **KW)
    return [o.token_ids for o in ref.generate(PROMPTS, GREEDY)], \
        [o.token_ids for o in ref.generate(PROMPTS[:1], SAMPLED)]


def _drain(group, ids, got):
    while group.has_unfinished():
        for o in group.step():
            if o.finished:
                got[(o.request_id, o.index)] = o.token_ids


@pytest.fixture(scope="module")
def instances():
    """One set of instances for the module: engines compiled by one test serve the next."""
    return Instances(init_model(CFG, seed=3), TOK, [2, 2, 2, 2], **KW)


def test_reconfigurations_under_load_keep_every_token(expected, instances):
    greedy_want, sampled_want = expected
    group = InstanceGroup(instances, Scripted([None, [8], None, [4, 2, 1, 1], None, None, [2, 2, 2, 2]]))
    got, ids = {}, []
    for wave in range(3):  # requests arrive while the partition changes under them
        for k, p in enumerate(PROMPTS):
            tier = TIERS[k % 2]
            ids.append(group.add_request(p, GREEDY, priority=k % 2, tier=tier))
        ids.append(group.add_request(PROMPTS[0], SAMPLED, tier=TIERS[1]))
        for _ in range(3):
            for o in group.step():
                if o.finished:
                    got[(o.request_id, o.index)] = o.token_ids
    _drain(group, ids, got)
    assert [r.new for r in group.reconfigurations] == [(8,), (4, 2, 1, 1), (2, 2, 2, 2)]
    assert any(r.requests_migrated for r in group.reconfigurations)
    for r in group.reconfigurations:
        assert r.weights_moved == r.weights_minimum < r.weights_full_reload and r.seconds > 0
    for wave in range(3):
        base = wave * (len(PROMPTS) + 1)
        assert [got[(ids[base + k], 0)] for k in range(len(PROMPTS))] == greedy_want
        assert [got[(ids[base + len(PROMPTS)], i)] for i in range(2)] == sampled_want
    observed = group.control.observed
    assert sum(a.get("interactive", 0) for a, _ in observed) == 6  # arrivals reached the controller
    assert sum(s.get("batch", 0) for _, s in observed) > 0  # and SLO-met finishes
    for e in group.engines:
        e.scheduler.prefix_cache.clear()
        assert e.scheduler.pool.num_free == e.runner.num_pages


def test_one_grpc_endpoint_serves_an_adaptive_group(expected, instances):
    greedy_want, _ = expected
    # Batch alone fits tp-2 instances best; interactive requests need a tp-4 one.
    profile = Profile({"interactive": {1: 0.0, 2: 0.0, 4: 3.0, 8: 4.0}, "batch": {1: 0.5, 2: 2.0, 4: 2.5, 8: 3.0}})
    controller = Controller(profile, TIERS, 8, window_s=0.2, confirm=1, min_dwell_s=0.0, hysteresis=0.0,
                            reconfig_s=lambda old, new: 0.0,
                            initial=Partition.parse(" + ".join(["tp2:batch"] * 4)))
    control = NitsumControl(controller)
    assert list(control.sizes) == instances.sizes
    # Windows close on arrivals, not on a clock a fast machine could finish every request
    # within: time stands still until an interactive request arrives, then moves one window
    # on, so the step after its arrival closes the (only) window, which counts it.
    now = [0.0]
    group = InstanceGroup(instances, control, clock=lambda: now[0])
    add = group.add_request

    def add_request(prompt, params=None, request_id=None, priority=0, tier=None):
        if tier is not None and tier.name == "interactive":
            now[0] = controller.window_s
        return add(prompt, params, request_id=request_id, priority=priority, tier=tier)

    group.add_request = add_request
    srv = Server(group, ServingConfig(tiers=("interactive:10000:1000:4", "batch:60000:5000"))).start()
    try:
        with Client(f"127.0.0.1:{srv.port}") as c:
            def one(k):
                return c.generate(PROMPTS[k % len(PROMPTS)], temperature=0, max_tokens=10, ignore_eos=True,
                                  tier=("interactive", "batch")[k % 2])[0]["token_ids"]
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                got = list(pool.map(one, range(16)))
            assert got == [greedy_want[k % len(PROMPTS)] for k in range(16)]
            stats = c.server_stats()
            assert {t.tier.name: t.finished for t in stats.tiers} == {"interactive": 8, "batch": 8}
        assert settled(srv)
    finally:
        srv.stop(grace=1)
    # The interactive arrivals made the controller give them a tp-4 instance.
    assert group.reconfigurations and group.reconfigurations[0].old == (2, 2, 2, 2)
    assert 4 in group.reconfigurations[0].new
    assert any(d.switched for d in controller.history)
