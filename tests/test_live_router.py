"""The live router (jinfer/router/server.py) in front of two replica server processes on loopback (a
third, killed and restarted, for failover)."""

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx
import openai
import pytest

from entrypoints.process import ServerProcess
from entrypoints.routing import router_server
from jinfer import TEST_MODEL_DIR
from jinfer.router.config import RouterConfig
from jinfer.serving.client import Client
from jinfer.tokenizer import Tokenizer
from scheduler.cost_model import analytic_7b_h100
from scheduler.routing.policies import E2Options
from tests.serving_util import HANG_S, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE, PAGES = 16, 24  # 384 tokens of KV per replica: a few prompts fill it
TEST_CONFIG = f"--config={os.path.join(ROOT, 'configs', 'test_5m.py')}"  # the 5.1M test model, not the default
REPLICA_ARGS = [TEST_CONFIG, "--config.serving.port=0", "--config.serving.metrics_port=0",
                "--config.engine.warmup=False", f"--config.cache.page_size={PAGE}", f"--config.cache.num_pages={PAGES}",
                "--config.scheduler.max_model_len=256", "--config.scheduler.max_num_batched_tokens=64",
                "--config.scheduler.max_num_seqs=8", "--config.serving.shutdown_grace_s=2"]
EXPLOIT_ONLY = E2Options(rebalance=False, replicate=False, pd_balance=False)
# The victim runs 4 requests at once (more queue) and has room for them without preemption.
VICTIM_ARGS = [a for a in REPLICA_ARGS if not a.startswith(("--config.cache.num_pages=", "--config.scheduler.max_num_seqs="))]
VICTIM_ARGS += ["--config.cache.num_pages=80", "--config.scheduler.max_num_seqs=4"]
# Health checks often, so a hung replica is found in seconds; each may take 3 s, so a healthy
# replica on a loaded machine is never taken for a hung one.
FAST_FAILOVER = dict(report_interval_s=0.01, health_interval_s=0.1, health_timeout_s=3.0, health_failures=2)


@pytest.fixture(scope="module")
def replicas():
    cpus = sorted(os.sched_getaffinity(0))
    procs = [ServerProcess(REPLICA_ARGS, cpus={cpus[i % len(cpus)]}).start() for i in range(2)]
    try:
        for p in procs:
            p.wait_ready(600)
        yield procs
    finally:
        codes = [p.stop() for p in procs]
    assert codes == [0, 0], f"replicas exited with {codes}"


def _router(replicas, policy="preble-e2", options=EXPLOIT_ONLY, **cfg):
    return router_server([p.target for p in replicas], policy, analytic_7b_h100(), options,
                         RouterConfig(report_interval_s=0.01, **cfg), tokenizer="auto").start()


@pytest.fixture
def router(replicas):
    for p in replicas:  # every test starts with cold replica caches
        with Client(p.target) as c:
            c.reset_prefix_cache()
    r = _router(replicas)
    yield r
    r.stop(grace=1)


def _ids(rng, n):
    return [rng.randrange(10, 4000) for _ in range(n)]


def _settled(client, replicas=2, timeout=HANG_S):
    """Router stats once every replica reports idle (its last reports have arrived)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.router_stats()
        if all(r.connected and r.load.outstanding == 0 and r.load.running == 0 and r.load.waiting == 0
               and r.outstanding == 0 for r in st.replicas) and len(st.replicas) == replicas:
            return st
        time.sleep(0.05)
    raise AssertionError(f"replicas did not settle: {client.router_stats()}")


def test_router_relays_replica_output_and_exploits_the_shared_prefix(replicas, router):
    rng = random.Random(0)
    prompt = _ids(rng, 40)
    with Client(replicas[1].target) as direct:
        want = direct.generate(prompt, max_tokens=8, ignore_eos=True)[0]
        want_text = direct.generate("def main():", max_tokens=6)[0]
        direct.reset_prefix_cache()
    with Client(f"127.0.0.1:{router.port}") as c:
        got = c.generate(prompt, max_tokens=8, ignore_eos=True)[0]
        assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"]
        got_text = c.generate("def main():", max_tokens=6)[0]  # tokenized by the router, as the replica would
        assert got_text["token_ids"] == want_text["token_ids"] and got_text["text"] == want_text["text"]
        shared = _ids(rng, 64)
        outs = [c.generate(shared + _ids(rng, 8), max_tokens=4, ignore_eos=True)[0] for _ in range(4)]
        assert [o["usage"]["cached_prompt_tokens"] for o in outs] == [0, 64, 64, 64]
        st = _settled(c)
    routed = [r.routed for r in st.replicas]
    assert sum(routed) == 6 and max(routed) >= 4  # the three followers went where the prefix was
    assert st.policy == "preble-e2" and st.decisions["exploit"] == 3
    assert all(r.failed == 0 for r in st.replicas)


def test_replica_evictions_keep_the_router_tree_true(replicas, router):
    rng = random.Random(1)
    prompts = [_ids(rng, 150) for _ in range(10)]  # 1500 tokens through 2 x 384 tokens of KV
    with Client(f"127.0.0.1:{router.port}") as c:
        for p in prompts:
            c.generate(p, max_tokens=2, ignore_eos=True)
        st = _settled(c)
        assert all(r.evicted_tokens > 0 for r in st.replicas), st
        # The tree holds what the replicas hold: their pools, plus each prompt's partial last page.
        claimed = router.call(lambda: [router.policy.tree.cached_lengths(p, range(2)) for p in prompts])
        per_replica = [sum(c_[r] for c_ in claimed) for r in range(2)]
        assert all(t <= PAGES * PAGE + len(prompts) * PAGE for t in per_replica), per_replica
        assert sum(r.routed for r in st.replicas) == 10 and sum(per_replica) < 10 * 150
        router.call(router.policy.tree.check)
        # A reset through the router empties every replica and, by their reports, the tree.
        assert c.reset_prefix_cache() > 0
        wait_for(lambda: not router.call(lambda: sum(router.policy.tree.tokens_on.values())))
        assert router.call(lambda: sum(router.policy.tree.tokens_on.values())) == 0


def test_watch_replica_reports_load_and_merged_evictions(replicas):
    rng = random.Random(2)
    prompt = _ids(rng, 3 * PAGE + 5)
    with Client(replicas[0].target) as c:
        c.reset_prefix_cache()
        c.generate(prompt, max_tokens=1, ignore_eos=True)  # caches its 3 full prompt pages
        stream = c.watch_replica(min_interval_s=0.01)
        first = next(stream)
        assert first.load.num_pages == PAGES and first.load.page_size == PAGE and first.load.cached_pages >= 3
        assert first.load.free_pages + first.load.cached_pages == PAGES and not first.evictions
        assert c.reset_prefix_cache() == first.load.cached_pages
        ev = next(stream)
        # Leaf-first page evictions along one path arrive as one entry: (the whole path, keep 0).
        assert len(ev.evictions) == 1 and ev.evictions[0].keep == 0
        assert list(ev.evictions[0].token_ids)[:3 * PAGE] == prompt[:3 * PAGE]
        assert ev.load.cached_pages == 0 and ev.load.free_pages == PAGES
        stream.cancel()
        with pytest.raises(grpc.RpcError) as e:
            next(c.watch_replica(min_interval_s=-1))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "min_interval_s=-1" in e.value.details()


def test_bad_input_and_cancellation_leave_router_and_replicas_clean(replicas, router):
    rng = random.Random(3)
    with Client(f"127.0.0.1:{router.port}") as c:
        before = router.call(lambda: dict(router.policy.tree.tokens_on))
        cases = [([99999], {}, "[99999] are outside the vocabulary"),
                 (_ids(rng, 250), {"max_tokens": 16}, "exceeds max_model_len=256"),
                 (_ids(rng, 4), {"max_tokens": 0}, "max_tokens=0"),
                 ([], {}, "prompt is empty")]
        for prompt, params, msg in cases:
            with pytest.raises(grpc.RpcError) as e:
                c.generate(prompt, **params)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and msg in e.value.details()
        assert router.call(lambda: dict(router.policy.tree.tokens_on)) == before  # refused prompts never routed
        stream = c.generate_stream(_ids(rng, 20), max_tokens=200, ignore_eos=True)
        next(stream)
        stream.cancel()  # the replica aborts the request and returns its pages
        st = _settled(c)
        assert all(r.load.free_pages + r.load.cached_pages == PAGES for r in st.replicas)
        assert c.generate(_ids(rng, 10), max_tokens=3, ignore_eos=True)[0]["finish_reason"] == "length"
        with pytest.raises(grpc.RpcError) as e:
            next(c.watch_replica())
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_launch_router_tool_serves_and_exits_cleanly(replicas):
    targets = ",".join(p.target for p in replicas)
    with ServerProcess([f"--replicas={targets}", "--policy=round-robin", "--port=0", "--shutdown_grace_s=2",
                        "--health_interval_s=0.5", "--health_timeout_s=5", "--health_failures=2", "--max_reroutes=1",
                        "--http_port=0"], module="entrypoints.router") as proc:
        proc.wait_ready(120)
        assert replicas[0].http_port is None and proc.http_port not in (None, proc.port)
        with Client(proc.target) as c:
            outs = [c.generate("import os", max_tokens=3, ignore_eos=True)[0] for _ in range(2)]
            assert outs[0]["token_ids"] == outs[1]["token_ids"] and len(outs[0]["token_ids"]) == 3
            # The replicas' model has no chat template: chat is refused, clearly, before routing.
            response = httpx.post(f"http://{proc.http_target}/v1/chat/completions",
                                  json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["message"].startswith("this model has no chat template")
            st = c.router_stats()
            assert st.policy == "round-robin" and [r.routed for r in st.replicas] == [1, 1]
    assert proc.proc.returncode == 0
    tool = os.path.join(ROOT, "tools", "launch_router.py")
    for args, msg in [(["--replicas="], "--replicas is empty"),
                      ([f"--replicas={targets}", "--policy=preble-e2"], "needs a cost model"),
                      ([f"--replicas={targets}", "--cost_model=/nonexistent.json"], "--cost_model='/nonexistent.json'")]:
        res = subprocess.run([sys.executable, tool, *args], capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and msg in res.stderr, res.stderr[-2000:]


TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _raw_code(target: str, method: str, payload: bytes):
    """(code, details) of a call whose request is `payload`, raw bytes."""
    streaming = method.endswith("/Generate")
    with grpc.insecure_channel(target) as ch:
        call = (ch.unary_stream if streaming else ch.unary_unary)(method, request_serializer=None,
                                                                  response_deserializer=None)
        try:
            result = call(payload, timeout=30)
            if streaming:
                list(result)
        except grpc.RpcError as e:
            return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_router_answers_undecodable_bytes_invalid_argument(router):
    target = f"127.0.0.1:{router.port}"
    for method, payload in [("/jinfer.v1.Inference/Generate", b"\x0a\x02\xff\xfe"),  # text = invalid UTF-8
                            ("/jinfer.v1.Inference/Generate", b"\xff\xff\xff\xff"),  # not protobuf
                            ("/jinfer.v1.Router/GetRouterStats", b"\xff\xff\xff\xff")]:
        code, details = _raw_code(target, method, payload)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request could not be decoded"), \
            (method, payload, code)
    with Client(target) as c:
        assert c.generate([5, 6, 7], max_tokens=2, ignore_eos=True)[0]["finish_reason"] == "length"


def _aborted(replicas) -> int:
    """Samples the replicas ended unfinished so far (their goodput ledgers)."""
    total = 0
    for p in replicas:
        with Client(p.target) as c:
            total += sum(t.aborted for t in c.server_stats(timeout=HANG_S).tiers)
    return total


def test_router_serves_the_openai_api_routed_as_generate(replicas, tmp_path):
    """The router's HTTP API: every request routed by its policy (GetRouterStats counts them),
    the replicas' own tokens, OpenAI's error bodies, and a client that goes away aborting."""
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the replicas' tokenizer, with a chat template
        shutil.copy(os.path.join(TEST_MODEL_DIR, name), tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    tok = Tokenizer.from_dir(str(tmp_path))
    chat = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    chat_ids = tok.encode(tok.apply_chat_template(chat), add_special_tokens=False)
    prompt = "def fibonacci(n):"
    with Client(replicas[0].target) as direct:
        want = direct.generate(prompt, temperature=0, max_tokens=8, logprobs=True)[0]
        want_chat = direct.generate(chat_ids, temperature=0, max_tokens=8)[0]
    targets = ",".join(p.target for p in replicas)
    with ServerProcess([f"--replicas={targets}", "--policy=round-robin", "--port=0", "--http_port=0",
                        f"--tokenizer={tmp_path}", "--shutdown_grace_s=2", "--report_interval_s=0.01"],
                       module="entrypoints.router") as proc:
        proc.wait_ready(120)
        base = f"http://{proc.http_target}"
        with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60) as client, \
                Client(proc.target) as c:
            card = client.models.list().data[0]
            assert card.model_extra["max_model_len"] == 256 and card.model_extra["vocab_size"] == 4096
            assert httpx.get(f"{base}/health").json() == {"status": "serving"}
            ids = lambda choice: choice.model_extra["token_ids"]  # noqa: E731
            greedy = dict(model=card.id, max_tokens=8, temperature=0, extra_body={"return_token_ids": True})

            got = client.completions.create(prompt=prompt, logprobs=0, **greedy)
            choice = got.choices[0]
            assert (ids(choice), choice.text, choice.finish_reason) == (want["token_ids"], want["text"], "length")
            assert choice.logprobs.token_logprobs == pytest.approx(want["logprobs"], abs=1e-5)
            assert got.usage.completion_tokens == 8 and got.usage.prompt_tokens == want["usage"]["prompt_tokens"]
            chunks = list(client.completions.create(prompt=prompt, stream=True,
                                                    stream_options={"include_usage": True}, **greedy))
            assert sum((ids(ch.choices[0]) for ch in chunks if ch.choices), []) == want["token_ids"]
            assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want["text"]
            assert chunks[-1].usage.completion_tokens == 8

            got = client.chat.completions.create(messages=chat, **greedy).choices[0]
            assert (ids(got), got.message.content) == (want_chat["token_ids"], want_chat["text"])
            chunks = list(client.chat.completions.create(messages=chat, stream=True, **greedy))
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want_chat["text"]

            # Refused before routing, as OpenAI does: the router's checks and the API's.
            for body, message, param in [
                    ({"prompt": [99999]}, "prompt token ids [99999] are outside the vocabulary", "prompt"),
                    ({"prompt": "x", "tier": "gold"}, "unknown tier='gold'", "tier"),
                    ({"prompt": [5] * 250, "max_tokens": 16}, "exceeds max_model_len=256", "prompt"),
                    ({"prompt": "y " * 40_000}, "refused before tokenizing", "prompt"),
                    ({"prompt": "x", "temperature": "hot"}, "temperature: Input should be a valid number",
                     "temperature")]:
                response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
                assert response.status_code == 400, response.text
                error = response.json()["error"]
                assert message in error["message"], error
                assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, None)

            # A client that goes away: the relay is cancelled, so the replica aborts the request
            # and frees its pages. The replica is stopped while the close travels (it cannot
            # finish the request first, however fast it is) and resumed once the router has let
            # go of it.
            before, routed = _aborted(replicas), [r.routed for r in c.router_stats().replicas]
            stream = client.completions.create(model=card.id, prompt=prompt, max_tokens=200, stream=True,
                                               extra_body={"ignore_eos": True})
            next(iter(stream))
            serving = next(i for i, r in enumerate(c.router_stats().replicas) if r.routed > routed[i])
            os.kill(replicas[serving].proc.pid, signal.SIGSTOP)
            try:
                stream.close()
                _until(lambda: c.router_stats().replicas[serving].outstanding == 0, "the relay let go")
            finally:
                os.kill(replicas[serving].proc.pid, signal.SIGCONT)
            st = _settled(c)
            assert all(r.load.free_pages + r.load.cached_pages == PAGES for r in st.replicas)
            assert _until(lambda: _aborted(replicas) == before + 1, "the replica counts the request aborted")
            assert sum(r.routed for r in st.replicas) == 5 and all(r.routed and not r.failed for r in st.replicas)
    assert proc.proc.returncode == 0


def _until(cond, what: str, timeout: float = HANG_S):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


def _stream(client, prompt, max_tokens, out: dict) -> None:
    """One Generate stream: out["tokens"] grows as tokens arrive; out["error"] = (code, details)."""
    out.update(tokens=[], error=None)
    try:
        for msg in client.generate_stream(prompt, max_tokens=max_tokens, ignore_eos=True):
            out["tokens"] += msg.token_ids
    except grpc.RpcError as e:
        out["error"] = (e.code(), e.details())


def _streams(client, prompts, max_tokens):
    outs = [{"tokens": []} for _ in prompts]
    threads = [threading.Thread(target=_stream, args=(client, p, max_tokens, o)) for p, o in zip(prompts, outs)]
    for t in threads:
        t.start()
    return outs, threads


def test_router_fails_over_when_a_replica_hangs_or_dies_and_takes_it_back(replicas):
    with pytest.raises(ValueError, match="health_interval_s=0 must be in"):
        RouterConfig(health_interval_s=0)
    rng = random.Random(4)
    cpus = sorted(os.sched_getaffinity(0))
    victim = ServerProcess(VICTIM_ARGS, cpus={cpus[2 % len(cpus)]}).start()
    routers, restarted = [], None
    try:
        victim.wait_ready(600)
        for p in replicas:
            with Client(p.target) as c:
                c.reset_prefix_cache()
        # The victim is replica 0: ties go to it, so E2 sends each new prefix there first.
        a = router_server([victim.target] + [p.target for p in replicas], "preble-e2", analytic_7b_h100(), EXPLOIT_ONLY,
                          RouterConfig(**FAST_FAILOVER)).start()
        routers.append(a)
        b = router_server([victim.target], "round-robin", config=RouterConfig(**FAST_FAILOVER)).start()
        routers.append(b)
        with Client(f"127.0.0.1:{a.port}") as c, Client(f"127.0.0.1:{b.port}") as cb:
            routed = lambda: [r.routed for r in c.router_stats().replicas]  # noqa: E731
            up = lambda client: client.router_stats().replicas[0].connected  # noqa: E731

            # Hung (SIGSTOP): its watch stream stays open, its health checks time out.
            shared = _ids(rng, 64)
            c.generate(shared + _ids(rng, 8), max_tokens=2, ignore_eos=True)
            assert routed() == [1, 0, 0]
            os.kill(victim.proc.pid, signal.SIGSTOP)
            (out,), (t,) = _streams(c, [shared + _ids(rng, 8)], 4)  # exploits the victim, which never answers
            _until(lambda: not up(c), "the hung replica marked down")
            t.join(HANG_S)
            assert out["error"] is None and len(out["tokens"]) == 4  # routed again once marked down
            assert routed()[0] == 2 and sum(routed()[1:]) == 1
            os.kill(victim.proc.pid, signal.SIGCONT)
            _until(lambda: up(c), "the resumed replica taken back")

            # Killed (SIGKILL) with 4 long requests streaming there and 2 short ones sent after
            # them. It is stopped first, once the long ones have started, so however fast it is
            # they are cut mid-stream and the short ones reach it before it dies.
            prefix = _ids(rng, 16)  # 16 cached > 4 missed: E2 exploits the victim for all six
            long, long_threads = _streams(c, [prefix + _ids(rng, 4) for _ in range(4)], 236)  # to max_model_len
            _until(lambda: all(o["tokens"] for o in long), "4 streams started on the victim")
            os.kill(victim.proc.pid, signal.SIGSTOP)
            short, short_threads = _streams(c, [prefix + _ids(rng, 4) for _ in range(2)], 8)
            _until(lambda: routed()[0] == 8, "the 2 short requests sent to the victim")
            victim.kill()
            for t in long_threads + short_threads:
                t.join(HANG_S)
            for o in long:
                code, details = o["error"]
                assert 0 < len(o["tokens"]) < 236 and code == grpc.StatusCode.UNAVAILABLE, (o, code)
                assert f"replica {victim.target}" in details, details
            assert [(o["error"], len(o["tokens"])) for o in short] == [(None, 8)] * 2  # routed again
            assert routed()[0] == 8 and sum(routed()[1:]) == 3
            _until(lambda: not up(c), "the killed replica marked down")
            st = c.router_stats().replicas[0]
            assert st.cached_tokens == 0 and st.outstanding == 0
            assert a.call(lambda: [n for n in a.policy.tree.nodes() if 0 in n.cached_on or 0 in n.hits]) == []
            with pytest.raises(grpc.RpcError) as e:
                cb.generate(_ids(rng, 5), max_tokens=2)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"no replica is up: {victim.target} is down" in e.value.details()

            # Restarted on the same port: taken back cold, and routed to (it has no load history).
            args = [x for x in VICTIM_ARGS if not x.startswith("--config.serving.port=")]
            restarted = ServerProcess(args + [f"--config.serving.port={victim.port}"], cpus=victim.cpus).start()
            restarted.wait_ready(600)
            _until(lambda: up(c) and up(cb), "the restarted replica taken back")
            assert c.router_stats().replicas[0].cached_tokens == 0
            c.generate(_ids(rng, 20), max_tokens=2, ignore_eos=True)
            assert routed()[0] == 9
            assert cb.generate(_ids(rng, 5), max_tokens=2, ignore_eos=True)[0]["finish_reason"] == "length"
    finally:
        for r in routers:
            r.stop(grace=1)
        victim.stop()
        if restarted is not None:
            assert restarted.stop() == 0


def test_live_routing_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "live.md"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_live_routing.py"), "--replicas=2",
                          "--workloads=toolbench", "--num_requests=8", "--rate_factors=0.05",
                          "--policies=round-robin,preble-e2", "--num_pages=32", "--scales=toolbench:16", TEST_CONFIG,
                          "--override=--config.engine.warmup=False", f"--out={out}"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    table = out.read_text()
    row = next(line for line in table.splitlines() if line.startswith("| toolbench | 16 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    rr, e2, ratio = float(cells[3]), float(cells[4]), float(cells[5])
    assert rr > 0 and e2 > 0 and abs(ratio - rr / e2) < 0.02 and cells[-1] == "0"  # nothing failed
    assert "Median simulated/measured average latency" in table


def test_a_paused_request_resumes_through_the_router_on_its_replica(replicas, router):
    """A tool call through the router: the stream ends paused; Resume reaches the replica that
    holds its KV (another would answer NOT_FOUND) and continues exactly as one run over
    prompt + output + tool tokens; over the router's HTTP API as well."""
    prompt, tool = list(range(40, 60)), [300, 301, 302]
    with Client(replicas[0].target) as direct:
        full = direct.generate(prompt, temperature=0, max_tokens=10, ignore_eos=True)[0]["token_ids"]
        marker = next(t for k, t in enumerate(full[2:], 2) if t not in full[:k])
        with Client(f"127.0.0.1:{router.port}") as c:
            first = c.generate(prompt, temperature=0, max_tokens=10, ignore_eos=True, intercept_token_ids=[marker],
                               request_id="routed-tool")[0]
            assert first["paused"] and first["token_ids"][-1] == marker
            second = c.resume("routed-tool", tool)
            want = direct.generate(prompt + first["token_ids"] + tool, temperature=0, max_tokens=10,
                                   ignore_eos=True)[0]["token_ids"]
            n = len(second["token_ids"])
            assert second["token_ids"] == want[:n]
            assert second["paused"] == (marker in want[:n])  # paused again only at the marker
            while second["paused"]:  # the next resume still finds its replica
                second = c.resume("routed-tool", [])
            code = None
            try:
                c.resume("routed-tool", tool)
            except grpc.RpcError as e:
                code = e.code()
            assert code == grpc.StatusCode.NOT_FOUND
    assert _settled(Client(f"127.0.0.1:{router.port}"))
    web = _router(replicas, policy="round-robin", http_port=0)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{web.http_port}", timeout=60) as http:
            body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
                    "intercept_token_ids": [marker], "return_token_ids": True}
            first = http.post("/v1/completions", json=body).json()
            assert first["choices"][0]["finish_reason"] == "intercept"
            got = http.post(f"/v1/completions/{first['id']}/resume", json={"tool_output": tool, "return_token_ids": True})
            ids = got.json()["choices"][0]["token_ids"]
            assert ids == want[:len(ids)]
            while got.json()["choices"][0]["finish_reason"] == "intercept":  # the marker again: finish it
                got = http.post(f"/v1/completions/{first['id']}/resume", json={"tool_output": []})
            missing = http.post("/v1/completions/cmpl-nobody/resume", json={"tool_output": tool})
            assert missing.status_code == 404
    finally:
        web.stop(grace=1)


def test_replicas_join_and_leave_a_running_router(replicas):
    """A cluster that grows and shrinks: a replica added while the router serves gets requests
    (cold), a removed one gets none and is never taken back (even though it still answers), and
    re-added it joins under a new index; bad targets are refused by name."""
    rng = random.Random(7)
    a, b = (p.target for p in replicas)
    router = router_server([a], "round-robin", config=RouterConfig(report_interval_s=0.01, health_interval_s=0.05),
                           tokenizer="auto").start()
    try:
        def routed():
            return router.call(lambda: [(rep.target, rep.routed, rep.up) for rep in router.links])

        with Client(f"127.0.0.1:{router.port}") as c:
            c.generate(_ids(rng, 8), max_tokens=2, ignore_eos=True)
            assert router.add_replica(b) == 1
            assert router.replica_targets() == [a, b]
            for _ in range(4):
                c.generate(_ids(rng, 8), max_tokens=2, ignore_eos=True)
            assert [n for _, n, _ in routed()] == [3, 2]  # round-robin over both once b joined
            with pytest.raises(ValueError, match=f"replica {b} is already routed to"):
                router.add_replica(b)
            assert router.remove_replica(a) == 0
            assert router.replica_targets() == [b]
            for _ in range(3):
                c.generate(_ids(rng, 8), max_tokens=2, ignore_eos=True)
            assert routed() == [(a, 3, False), (b, 5, True)]
            with pytest.raises(ValueError, match="no replica 127.0.0.1:1 in the router"):
                router.remove_replica("127.0.0.1:1")
            with pytest.raises(ValueError, match=f"replica {b} is the router's last"):
                router.remove_replica(b)
            assert router.add_replica(a) == 2  # back under a new index, cold
            c.generate(_ids(rng, 8), max_tokens=2, ignore_eos=True)
            c.generate(_ids(rng, 8), max_tokens=2, ignore_eos=True)
            assert [(t, up) for t, _, up in routed()] == [(a, False), (b, True), (a, True)]
            assert sum(n for _, n, _ in routed()) == 10 and routed()[2][1] >= 1
            assert [r.target for r in c.router_stats().replicas][-2:] == [b, a]
    finally:
        router.stop(grace=1)


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_paused_request_migrates_when_its_replica_dies(replicas, fault):
    """The replica holding a paused request's KV dies (the router has marked it down before the
    Resume), or hangs (SIGSTOP: it still looks up when the Resume is forwarded to it, which waits
    until the health checks mark it down and cancel the call): the Resume goes to another
    replica as a fresh request over prompt + output + tool tokens, and streams what one run over
    them gives (and pauses there again at the marker)."""
    prompt, tool = list(range(40, 60)), [400, 401]
    victim = ServerProcess(REPLICA_ARGS).start()
    router = None
    try:
        victim.wait_ready(600)
        router = router_server([victim.target, replicas[0].target], "round-robin",
                               config=RouterConfig(**FAST_FAILOVER), tokenizer="auto").start()
        with Client(replicas[0].target) as direct, Client(f"127.0.0.1:{router.port}") as c:
            full = direct.generate(prompt, temperature=0, max_tokens=10, ignore_eos=True)[0]["token_ids"]
            marker = next(t for k, t in enumerate(full[2:], 2) if t not in full[:k])
            first = c.generate(prompt, temperature=0, max_tokens=10, ignore_eos=True, intercept_token_ids=[marker],
                               request_id="moving")[0]  # round-robin: replica 0, the victim
            assert first["paused"]
            assert router.call(lambda: [rep.routed for rep in router.links]) == [1, 0]
            if fault == "dies":
                victim.kill()
                assert wait_for(lambda: not router.call(lambda: router.links[0].up)), "the dead replica stayed up"
            else:
                os.kill(victim.proc.pid, signal.SIGSTOP)
                assert router.call(lambda: router.links[0].up)  # forwarded there, in flight when it goes down
            second = c.resume("moving", tool)
            assert not router.call(lambda: router.links[0].up)
            if fault == "hangs":
                assert "health checks in a row failed" in router.call(lambda: router.links[0].down_reason)
            want = direct.generate(prompt + first["token_ids"] + tool, temperature=0, max_tokens=10,
                                   ignore_eos=True)[0]["token_ids"]
            n = len(second["token_ids"])
            assert n >= 1 and second["token_ids"] == want[:n]
            assert second["paused"] == (marker in want[:n]) and (second["paused"] or n == len(want))
            while second["paused"]:  # paused again on the new replica: resumed there
                second = c.resume("moving", [])
            assert router.call(lambda: [rep.routed for rep in router.links])[1] >= 1
            with pytest.raises(grpc.RpcError) as e:
                c.resume("moving", tool)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        if router is not None:
            router.stop(grace=1)
        victim.kill()


def test_a_resume_answered_unavailable_by_a_stalled_replica_migrates(replicas):
    """The replica holding a paused request's K/V is alive, its watch stream still reporting,
    but its engine has stalled: it answers the forwarded Resume UNAVAILABLE before streaming.
    The router marks it down and the Resume migrates, streaming what one run over prompt +
    output + tool tokens gives."""
    from jinfer.config import CacheConfig, SchedulerConfig
    from jinfer.engine import Engine
    from jinfer.loader.hf import load_hf_model
    from jinfer.serving.server import Server, ServingConfig

    engine = Engine(load_hf_model(TEST_MODEL_DIR), Tokenizer.from_dir(TEST_MODEL_DIR),
                    CacheConfig(page_size=PAGE, num_pages=PAGES),
                    SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256))
    victim = Server(engine, ServingConfig(engine_stall_timeout_s=60.0, model_name="test-5m")).start()
    helper = replicas[0]
    release, real_step = threading.Event(), engine.step

    def stuck_step():
        release.wait()
        return real_step()

    prompt, tool = list(range(40, 60)), [400, 401]
    router = None
    try:
        router = router_server([f"127.0.0.1:{victim.port}", helper.target], "round-robin",
                               config=RouterConfig(report_interval_s=0.01, health_interval_s=3600.0),
                               tokenizer="auto").start()
        with Client(helper.target) as direct, Client(f"127.0.0.1:{router.port}") as c, \
                Client(f"127.0.0.1:{victim.port}") as stalled:
            full = direct.generate(prompt, temperature=0, max_tokens=10, ignore_eos=True)[0]["token_ids"]
            marker = next(t for k, t in enumerate(full[2:], 2) if t not in full[:k])
            first = c.generate(prompt, temperature=0, max_tokens=10, ignore_eos=True, intercept_token_ids=[marker],
                               request_id="stuck")[0]  # round-robin: replica 0, the victim
            assert first["paused"]
            victim.loop.stall_timeout_s = 1.0
            engine.step = stuck_step
            with pytest.raises(grpc.RpcError) as e:  # a step that never ends: the engine stalls
                stalled.generate([1, 2, 3], max_tokens=2, timeout=HANG_S)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "stalled" in e.value.details()
            assert router.call(lambda: router.links[0].up)  # its watch stream still reports
            second = c.resume("stuck", tool)
            assert "a Resume failed" in router.call(lambda: router.links[0].down_reason)
            want = direct.generate(prompt + first["token_ids"] + tool, temperature=0, max_tokens=10,
                                   ignore_eos=True)[0]["token_ids"]
            n = len(second["token_ids"])
            assert n >= 1 and second["token_ids"] == want[:n]
            while second["paused"]:  # paused again on the new replica: resumed there
                second = c.resume("stuck", [])
            assert router.call(lambda: [rep.routed for rep in router.links]) == [1, 1]  # the migration: a Generate
    finally:
        release.set()
        if router is not None:
            router.stop(grace=1)
        victim.stop(grace=0)
