"""Metrics, the benchmark client and the demo, against a server built from a launch config."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import urllib.request

import pytest

from entrypoints.build import build_server
from harness import benchmark as bm
from jinfer import TEST_MODEL_DIR
from jinfer.config import Tier
from jinfer.launch import default_config, resolve
from jinfer.serving.client import Client
from scheduler.simulation import workloads as w

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = (8, 4096)
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def server():
    cfg = default_config()
    cfg.model.path = "test-5m"
    cfg.cache.num_pages, cfg.scheduler.max_num_batched_tokens, cfg.scheduler.max_num_seqs = 96, 64, 8
    cfg.scheduler.max_model_len = 192
    cfg.engine.warmup = False
    cfg.serving.tiers, cfg.serving.metrics_port = ("interactive", "batch"), 0
    srv = build_server(resolve(cfg)).start()
    yield srv
    srv.stop(grace=1)


def _metrics(srv) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


def test_metrics_count_tokens_latencies_and_prefix_hits(server):
    prompt = list(range(100, 148))  # 48 tokens: 2 full pages shared by the second request
    with Client(f"127.0.0.1:{server.port}") as c:
        first = c.generate(prompt, max_tokens=8, ignore_eos=True, tier="batch")
        second = c.generate(prompt, max_tokens=8, ignore_eos=True)
    assert second[0]["usage"]["cached_prompt_tokens"] == 32 and first[0]["usage"]["cached_prompt_tokens"] == 0
    m = _metrics(server)
    assert m['jinfer_time_to_first_token_seconds_count{tier="batch"}'] == 1
    assert m['jinfer_time_to_first_token_seconds_count{tier="interactive"}'] == 1
    assert m['jinfer_time_per_output_token_seconds_count{tier="interactive"}'] == 1
    assert m['jinfer_request_latency_seconds_count{tier="batch"}'] == 1
    assert m["jinfer_generation_tokens_total"] == 16 and m["jinfer_prompt_tokens_total"] == 96
    assert m["jinfer_cached_prompt_tokens_total"] == 32
    assert m["jinfer_prefix_cache_hit_rate"] == pytest.approx(32 / 96)
    assert m['jinfer_requests_finished_total{finish_reason="length"}'] == 2
    assert m["jinfer_requests_running"] == 0 and m["jinfer_requests_waiting"] == 0
    assert 0 < m["jinfer_kv_page_utilization"] < 1  # the cached prefix still holds its pages
    assert m["jinfer_generation_tokens_per_second"] > 0


def test_server_info_reports_the_resolved_config(server):
    with Client(f"127.0.0.1:{server.port}") as c:
        info = c.server_info()
    cfg = json.loads(info.config_json)
    assert cfg["cache"]["num_pages"] == 96 and cfg["serving"]["tiers"] == ["interactive", "batch"]
    assert info.model == "test-5m"


def test_replay_multi_turn_shared_prefix_and_slos(server, tmp_path):
    chat = w.poisson_arrivals(w.multi_turn(2, turns=2, system_len=20, user_len=6, output_len=5, spread=0,
                                           vocab=VOCAB, tiers={"interactive": 1}, seed=1), 50.0)
    shared = w.poisson_arrivals(w.shared_prefix(6, num_groups=2, prefix_len=40, suffix_len=6, output_len=4,
                                                vocab=VOCAB, tiers={"batch": 1}, seed=2), 50.0)
    too_long = [w.WorkItem(0.0, tuple(range(10, 250)), 4, "batch")]  # past max_model_len=192
    items = w.merge(chat, shared, too_long)
    run = bm.replay(f"127.0.0.1:{server.port}", items, progress=False)
    by_index = {id(it): r for it, r in zip(items, run.results)}
    bad = by_index[id(too_long[0])]
    assert bad.error.startswith("INVALID_ARGUMENT") and "192" in bad.error
    assert all(r.ok and r.finish_reason == "length" for r in run.results if r is not bad)
    # A later turn resends the conversation: earlier prompt + the reply + the new message.
    for s in ("s0", "s1"):
        t0, t1 = [(it, r) for it, r in zip(items, run.results) if it.session == s]
        assert t1[1].prompt_tokens == t0[1].prompt_tokens + t0[1].output_tokens + t1[0].prompt_len
        assert t1[1].cached_tokens >= 16 and t1[1].arrival_s >= t0[1].finish_s
    summary = bm.summarize(run, {"interactive": Tier("interactive", 60.0, 60.0), "batch": Tier("batch", 1e-6, 60.0)})
    assert summary["requests"] == len(items) and summary["failed"] == 1 and summary["errors"] == {"INVALID_ARGUMENT": 1}
    assert summary["tiers"]["interactive"]["attainment"] == 1.0 and summary["tiers"]["batch"]["attainment"] == 0
    assert summary["tiers"]["interactive"]["goodput_rps"] == pytest.approx(4 / run.duration_s)
    assert summary["prefix_hit_rate"] > 0 and summary["output_throughput"] > 0
    for metric in ("ttft_ms", "tpot_ms", "latency_ms"):
        st = summary[metric]
        assert 0 < st["p50"] <= st["p90"] <= st["p99"]
    report = bm.format_report(summary)
    assert "| interactive | 60000 | 60000 | 100.0 % |" in report and "INVALID_ARGUMENT x1" in report
    doc = json.loads(json.dumps(bm.result_json(run, summary, {"workload": "test"})))
    assert len(doc["requests"]) == len(items) and doc["server"]["tiers"] == ["interactive", "batch"]
    bm.save_plot(run, str(tmp_path / "run.png"))
    assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"


def test_slo_spec_parsing():
    assert bm.parse_slos(["gold:250:25", "tin:1000:100:2"]) == {"gold": Tier("gold", 0.25, 0.025),
                                                                "tin": Tier("tin", 1.0, 0.1, 2.0)}
    for bad in ("gold:250", "gold:x:1", ":1:1", "gold:0:5"):
        with pytest.raises(ValueError):
            bm.parse_slos([bad])
    r = bm.Result(0, -1, 0.0, 0, tier="t", first_token_s=0.1, finish_s=0.5, output_tokens=5)
    assert r.tpot_s == pytest.approx(0.1) and r.meets(Tier("t", 0.1, 0.1)) and not r.meets(Tier("t", 0.09, 1))
    assert not math.isnan(r.latency_s) and not bm.Result(0, -1, 0.0, 0, tier="t", error="X: y").meets(Tier("t"))


def _tool(*args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark_serving.py"), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_benchmark_tool_end_to_end_and_its_errors(server, tmp_path):
    target = f"--target=127.0.0.1:{server.port}"
    result, trace = tmp_path / "r.json", tmp_path / "t.jsonl"
    proc = _tool(target, "--workload=random", "--num_requests=3", "--input_len=12", "--output_len=4",
                 "--rate=inf", "--tiers=batch:1", "--slo=batch:60000:60000", f"--result_file={result}",
                 f"--save_trace={trace}", "--progress=false")
    assert proc.returncode == 0, proc.stderr
    assert "| batch | 60000 | 60000 | 100.0 % |" in proc.stdout
    doc = json.loads(result.read_text())
    assert doc["summary"]["completed"] == 3 and doc["settings"]["rate"] is None
    assert len(w.load_trace(str(trace))) == 3
    proc = _tool(target, "--workload=trace", f"--trace={trace}", "--rate=0", "--progress=false")
    assert proc.returncode == 0 and "requests: 3 completed, 0 failed" in proc.stdout
    proc = _tool(target, "--slo=platinum:1:1")
    assert proc.returncode != 0 and "tiers ['platinum'] are not served" in proc.stderr
    proc = _tool(target, "--slo=batch:fast:1")
    assert proc.returncode != 0 and "must be numbers" in proc.stderr
    proc = _tool("--target=127.0.0.1:1", "--progress=false")
    assert proc.returncode != 0 and "cannot reach 127.0.0.1:1" in proc.stderr


def test_demo_serves_replays_reports_and_shuts_down_cleanly(tmp_path):
    """`make demo` on the test model (given a chat template, which it ships without, for the
    demo's chat) with configs/test_5m.py's tier targets, minus the warm-up compilation (the first
    steps compile what they need)."""
    model = tmp_path / "test_model"
    shutil.copytree(TEST_MODEL_DIR, model)
    (model / "chat_template.jinja").write_text(TEMPLATE)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "demo.py"),
                           f"--config={os.path.join(ROOT, 'configs', 'test_5m.py')}",
                           "--slo=interactive:250:50", "--slo=batch:2000:100", "--rate=1",
                           f"--override=--config.model.path={model}",
                           "--override=--config.engine.warmup=false", "--override=--config.engine.compilation_cache="],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    completed, failed = map(int, re.search(r"requests: (\d+) completed, (\d+) failed", out).groups())
    assert completed > 0 and failed == 0
    hit_rate = float(re.search(r"prefix-cache hit rate ([\d.]+) %", out).group(1))
    assert 0 < hit_rate <= 100  # the interactive requests share prefixes
    attained = re.search(r"\| interactive \| 250 \| 50 \| ([\d.]+) % \|", out)  # the tier's SLO row
    assert attained and 0 <= float(attained.group(1)) <= 100
    assert "jinfer_prefix_cache_hit_rate" in out
    assert "server shut down cleanly" in out and "shutting down" in proc.stderr
