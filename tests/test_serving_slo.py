"""SLO tiers through the real server, as an outside client sees them: the tiers' targets in
GetServerInfo, the server's own goodput count (GetServerStats, Prometheus) against what the
client measured from its streams, and admission refusals by the SLO-aware policy."""

import os
import re
import subprocess
import sys
import urllib.request

import grpc
import pytest

from harness import benchmark as bm
from jinfer import TEST_MODEL_DIR
from jinfer.config import CacheConfig, SchedulerConfig, Tier
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.request import RequestOutput, Usage
from jinfer.serving.client import Client
from jinfer.serving.goodput import Goodput
from jinfer.serving.server import Server, ServingConfig
from jinfer.tokenizer import Tokenizer
from scheduler.simulation import workloads as w
from scheduler.slo.policies import SloAware
from tests.serving_util import StepGate, settled, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LEN = 96
# 1 µs targets no step can meet; a minute any step meets; a tier nobody judges.
TIERS = ("tight:0.001:0.001:4", "loose:60000:60000", "background:best_effort")
COUNTS = ("finished", "slo_met", "ttft_missed", "tpot_missed", "goodput_tokens", "aborted", "refused", "demoted")


def _engine(policy=None):
    return Engine(load_hf_model(TEST_MODEL_DIR), Tokenizer.from_dir(TEST_MODEL_DIR),
                  CacheConfig(page_size=16, num_pages=64),
                  SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=MAX_LEN), policy)


@pytest.fixture(scope="module")
def server():
    srv = Server(_engine(), ServingConfig(tiers=TIERS, metrics_port=0)).start()
    yield srv
    srv.stop(grace=1)


def _counts(stats) -> dict[str, dict[str, int]]:
    return {t.tier.name: {k: getattr(t, k) for k in COUNTS} for t in stats.tiers}


def _metrics(srv) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


def test_server_info_lists_each_tier_with_its_targets(client):
    info = client.server_info()
    assert list(info.tiers) == ["tight", "loose", "background"]
    got = {t.name: (t.ttft_ms, t.tpot_ms, t.weight, t.best_effort, t.judged) for t in info.tier_info}
    assert got["tight"] == (pytest.approx(0.001), pytest.approx(0.001), 4.0, False, True)
    assert got["loose"] == (60000.0, 60000.0, 1.0, False, True)
    assert got["background"] == (0.0, 0.0, 1.0, True, False)  # 0 ms: no target


def test_unknown_tier_is_invalid_argument_and_the_server_keeps_serving(client, server):
    with pytest.raises(grpc.RpcError) as err:
        client.generate("def f(x):", tier="gold", max_tokens=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown tier='gold'; known: ['tight', 'loose', 'background']" in err.value.details()
    assert client.generate("def f(x):", tier="loose", max_tokens=2)[0]["finish_reason"] in ("length", "stop")
    assert [t.tier.name for t in client.server_stats().tiers] == ["tight", "loose", "background"]
    assert settled(server)


def test_server_goodput_counts_equal_what_the_client_measured(client, server):
    items = [w.WorkItem(0.02 * i, tuple(range(20 + i, 30 + 2 * i)), max_tokens, tier)
             for i, (tier, max_tokens) in enumerate([("tight", 4), ("loose", 5), ("tight", 1), ("loose", 3),
                                                     ("tight", 6), ("background", 3), ("loose", 1)])]
    before = _counts(client.server_stats())
    run = bm.replay(f"127.0.0.1:{server.port}", items, progress=False)
    after = client.server_stats()
    assert all(r.ok and r.finish_reason == "length" for r in run.results)
    delta = {tier: {k: c[k] - before[tier][k] for k in COUNTS} for tier, c in _counts(after).items()}

    slos = bm.server_tiers(run.server)
    assert set(slos) == {"tight", "loose"}  # the best-effort tier is not judged
    for tier in ("tight", "loose"):
        rs, slo = [r for r in run.results if r.tier == tier], slos[tier]
        assert delta[tier] == {
            "finished": len(rs), "slo_met": sum(r.meets(slo) for r in rs),
            "ttft_missed": sum(r.ttft_s > slo.ttft_s for r in rs),
            "tpot_missed": sum(r.tpot_s > slo.tpot_s for r in rs),  # nan (one token) is no miss
            "goodput_tokens": sum(r.output_tokens for r in rs if r.meets(slo)),
            "aborted": 0, "refused": 0, "demoted": 0}
    assert delta["tight"]["ttft_missed"] == 3 and delta["tight"]["tpot_missed"] == 2  # the 1-token one has no TPOT
    assert delta["loose"]["slo_met"] == 3 and delta["loose"]["goodput_tokens"] == 9
    assert delta["background"] == {**dict.fromkeys(COUNTS, 0), "finished": 1}

    loose = next(t for t in after.tiers if t.tier.name == "loose")
    assert after.uptime_s > run.duration_s and after.window_s == 60
    assert loose.goodput_rps == pytest.approx(loose.slo_met / after.uptime_s)
    assert loose.recent_goodput_tokens_per_s > 0 and loose.tier.ttft_ms == 60000

    # The benchmark's own read of the server (GetServerStats around the run) agrees, and reports it.
    assert {t: {k: v[k] for k in COUNTS} for t, v in run.server_stats.items()} == delta
    report = bm.format_report(bm.summarize(run, slos))
    assert "| loose | 3 | 3 | 0 | 0 | 0 | 0 | 0 |" in report and "| tight | 3 | 0 | 3 | 2 |" in report
    assert "| background | 1 | - | - | - |" in report

    m = _metrics(server)
    for name, field in [("jinfer_tier_requests_finished_total", "finished"), ("jinfer_slo_met_total", "slo_met"),
                        ("jinfer_ttft_miss_total", "ttft_missed"), ("jinfer_tpot_miss_total", "tpot_missed"),
                        ("jinfer_goodput_tokens_total", "goodput_tokens"), ("jinfer_requests_refused_total", "refused"),
                        ("jinfer_requests_demoted_total", "demoted"), ("jinfer_requests_aborted_total", "aborted")]:
        for t in after.tiers:
            assert m[f'{name}{{tier="{t.tier.name}"}}'] == getattr(t, field), (name, t.tier.name)
    assert m['jinfer_goodput_requests_per_second{tier="loose"}'] > 0
    assert m['jinfer_goodput_requests_per_second{tier="tight"}'] == 0


def test_a_cancelled_stream_counts_as_aborted(client, server, monkeypatch):
    before = _counts(client.server_stats())["loose"]
    StepGate(monkeypatch, server.loop)  # held after its first message: it cannot finish before the cancel
    stream = client.generate_stream("class A:", tier="loose", max_tokens=60, ignore_eos=True)
    next(stream)
    stream.cancel()
    # The abort reaches the engine thread after the call ends.
    wait_for(lambda: _counts(client.server_stats())["loose"]["aborted"] != before["aborted"])
    after = _counts(client.server_stats())["loose"]
    assert after["aborted"] == before["aborted"] + 1 and after["finished"] == before["finished"]
    assert settled(server)


@pytest.fixture(scope="module")
def gated():
    """SloAware with admission: its step-time prior (an hour a step) says no TTFT target of 10
    minutes can be met until it has measured real steps, so the first `gated` request is refused
    for sure; once it has, the target is met on any machine that is not hung."""
    policy = SloAware(admission=True, step_s=3600.0)
    srv = Server(_engine(policy), ServingConfig(tiers=("gated:600000:0.001", "open"))).start()
    yield srv, policy
    srv.stop(grace=1)


def test_admission_refusal_is_resource_exhausted_naming_the_tier_and_counted(gated):
    srv, policy = gated
    with Client(f"127.0.0.1:{srv.port}") as c:
        with pytest.raises(grpc.RpcError) as err:
            c.generate("def f(x):", tier="gated", max_tokens=4)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tier 'gated' cannot meet its TTFT target of 600000 ms" in err.value.details()
        assert settled(srv)  # nothing was queued: every page is free (or a cached prefix)
        assert srv.loop.engine.load().running == 0

        # The untargeted tier is never refused; its steps teach the policy the real step time,
        # after which the gated tier is admitted: it meets its TTFT, but no step meets a 1 µs
        # TPOT, so the policy demotes it once it has its first token.
        assert c.generate("import os\n", tier="open", max_tokens=8, ignore_eos=True)[0]["finish_reason"] == "length"
        assert policy.typical_s < 600.0
        out = c.generate("def g(y):", tier="gated", max_tokens=6, ignore_eos=True)[0]
        assert out["finish_reason"] == "length" and out["ttft_s"] < 600.0
        stats = _counts(c.server_stats())
    assert stats["gated"] == {**dict.fromkeys(COUNTS, 0), "finished": 1, "tpot_missed": 1, "refused": 1,
                              "demoted": 1}
    assert stats["open"] == {**dict.fromkeys(COUNTS, 0), "finished": 1}
    assert policy.refusals["gated"] == 1
    assert settled(srv)


def test_benchmark_tool_judges_by_the_server_targets_and_prints_its_count(server):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark_serving.py"),
                           f"--target=127.0.0.1:{server.port}", "--workload=random", "--num_requests=3",
                           "--input_len=8", "--output_len=3", "--spread=0", "--rate=inf", "--tiers=loose:1",
                           "--progress=false"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # No --slo: the workload's tier is judged by the server's targets; the tiers it did not use are not.
    assert "| loose | 60000 | 60000 | 100.0 % |" in proc.stdout and "| tight |" not in proc.stdout
    assert "server's count over the run" in proc.stdout and "| loose | 3 | 3 | 0 | 0 | 0 | 0 | 0 |" in proc.stdout


def _out(request_id, index, tokens, arrival, first, finish, reason="length"):
    return RequestOutput(request_id, index, [], "", None, list(range(tokens)), "", True, reason,
                         Usage(3, tokens, 0), arrival, first, finish)


def test_goodput_ledger_by_hand():
    """Samples of n > 1, a partial abort, one-token samples, a tier outside the table, the window."""
    gold, bulk = Tier("gold", ttft_s=0.1, tpot_s=0.01), Tier("bulk")
    g = Goodput((gold, bulk), window_s=10.0, clock=lambda: 0.0)
    g.on_admit("a", gold, 3)
    g.on_outputs([_out("a", 0, 5, 0.0, 0.05, 0.09),  # met: 50 ms, 10 ms a token
                  _out("a", 1, 1, 0.0, 0.2, 0.2)], now=1.0)  # TTFT missed; one token: no TPOT to miss
    g.on_done("a")  # the third sample never finished: aborted
    g.on_admit("b", gold, 1)
    g.on_outputs([_out("b", 0, 3, 0.0, 0.05, 0.5)], now=20.0)  # TPOT missed; the window drops "a"
    g.on_done("b")
    g.on_admit("c", Tier("other", ttft_s=1.0, tpot_s=1.0), 1)
    g.on_outputs([_out("c", 0, 2, 0.0, 0.1, 0.2)], now=20.0)
    g.on_done("c")
    g.on_admit("d", bulk, 2)
    g.on_refused(bulk, 2)
    g.on_outputs([_out("d", 0, 4, 0.0, 9.0, 99.0), _out("d", 1, 4, 0.0, 9.0, 99.0, reason="abort")], now=20.0)
    g.on_done("d")
    s = g.snapshot(now=20.0)
    assert [t.tier.name for t in s.tiers] == ["gold", "bulk", "other"]
    got = {t.tier.name: (t.finished, t.slo_met, t.ttft_missed, t.tpot_missed, t.goodput_tokens, t.aborted, t.refused)
           for t in s.tiers}
    assert got == {"gold": (3, 1, 1, 1, 5, 1, 0), "bulk": (1, 0, 0, 0, 0, 1, 2), "other": (1, 1, 0, 0, 2, 0, 0)}
    assert s.tier("gold").goodput_rps == pytest.approx(1 / 20) and s.tier("gold").recent_goodput_rps == 0
    assert s.tier("other").recent_goodput_tokens_per_s == pytest.approx(2 / 10)
    with pytest.raises(ValueError, match="window_s=0"):
        Goodput((gold,), window_s=0)
