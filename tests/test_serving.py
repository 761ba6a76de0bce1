"""The gRPC server on an ephemeral loopback port, with the test model."""

import concurrent.futures
import filecmp
import os
import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jinfer import TEST_MODEL_DIR
from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.sampling_params import SamplingParams
from jinfer.serving import inference_pb2 as pb
from jinfer.serving import inference_pb2_grpc as pb_grpc
from jinfer.serving.client import Client
from jinfer.serving.loop_commands import Abort, Add
from jinfer.serving.server import Server, ServingConfig
from jinfer.tokenizer import Tokenizer
from tests.serving_util import HANG_S, StepGate, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LEN = 96


def _engine(**cache):
    return Engine(load_hf_model(TEST_MODEL_DIR), Tokenizer.from_dir(TEST_MODEL_DIR),
                  CacheConfig(page_size=16, num_pages=64, **cache),
                  SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=MAX_LEN))


@pytest.fixture(scope="module")
def server():
    srv = Server(_engine(enable_prefix_cache=False),
                 ServingConfig(tiers=("interactive", "batch"), max_request_bytes=4096, model_name="default")).start()
    yield srv
    srv.stop(grace=1)


def test_stream_equals_engine_generate(client):
    prompts = ["def fibonacci(n):", "import os\n"]
    greedy = SamplingParams(temperature=0, max_tokens=12)
    sampled = SamplingParams(temperature=0.8, top_k=50, seed=7, max_tokens=10, n=2, logprobs=True)
    eng = _engine(enable_prefix_cache=False)
    want = eng.generate(prompts, greedy) + eng.generate(prompts[:1], sampled)
    got = (client.generate(prompts[0], temperature=0, max_tokens=12) + client.generate(prompts[1], temperature=0, max_tokens=12)
           + client.generate(prompts[0], temperature=0.8, top_k=50, seed=7, max_tokens=10, n=2, logprobs=True))
    assert [g["token_ids"] for g in got] == [w.token_ids for w in want]
    assert [g["text"] for g in got] == [w.text for w in want]
    assert [g["finish_reason"] for g in got] == [w.finish_reason for w in want]
    for g in got[2:]:
        assert len(g["logprobs"]) == len(g["token_ids"]) and all(lp <= 0 for lp in g["logprobs"])
    first = got[0]
    assert first["usage"]["prompt_tokens"] == len(Tokenizer.from_dir(TEST_MODEL_DIR).encode(prompts[0]))
    assert first["usage"]["completion_tokens"] == len(first["token_ids"]) and first["ttft_s"] > 0


@pytest.mark.parametrize("prompt, params, message", [
    ("", {}, "prompt is empty"),
    ([], {}, "prompt is empty"),
    ("x", dict(temperature=-1.0), "temperature=-1.0 must be finite and >= 0"),
    ("x", dict(top_p=1.5), "top_p=1.5 must be in (0, 1]"),
    ("x", dict(tier="gold"), "unknown tier='gold'; known: ['interactive', 'batch']"),
    ("x", dict(max_tokens=0), "max_tokens=0 must be > 0"),
    ("x", dict(max_tokens=MAX_LEN), f"max_tokens={MAX_LEN} leaves no room for a prompt within max_model_len={MAX_LEN}"),
    ("x", dict(max_tokens=MAX_LEN - 1), f"exceeds max_model_len={MAX_LEN}"),
    ([7] * (MAX_LEN + 1), {}, f"exceeds max_model_len={MAX_LEN}"),
    ([1, 2, 99999], {}, "prompt token ids [99999] are outside the vocabulary [0, 4096)"),
    ("y" * 5000, {}, "max_request_bytes=4096"),
])
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(client, server, prompt, params, message):
    with pytest.raises(grpc.RpcError) as err:
        client.generate(prompt, **params)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert client.generate("def f(x):", temperature=0, max_tokens=3)[0]["finish_reason"] in ("length", "stop")
    assert server.loop.num_outstanding == 0


def test_cancel_mid_stream_frees_pages(client, server, monkeypatch):
    engine = server.loop.engine
    StepGate(monkeypatch, server.loop, outputs=2)  # held after its second message: it cannot finish alone
    stream = client.generate_stream("class A:", temperature=0, max_tokens=60, ignore_eos=True)
    next(stream)
    next(stream)
    load = engine.load()
    assert load.free_pages + load.cached_pages < load.num_pages  # the running request holds pages
    stream.cancel()
    held = lambda: engine.load().num_pages - engine.load().free_pages - engine.load().cached_pages
    wait_for(lambda: not (held() or server.loop.num_outstanding))
    assert held() == 0 and server.loop.num_outstanding == 0


def test_fifty_concurrent_streams_complete(client):
    def one(i):
        return client.generate(f"def f{i}(x):", temperature=0, max_tokens=4, ignore_eos=True)[0]

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        outs = list(pool.map(one, range(50)))
    assert all(len(o["token_ids"]) == 4 and o["finish_reason"] == "length" for o in outs)


def test_health_reflection_and_server_info(client, server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "jinfer.v1.Inference"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    info = client.server_info()
    assert (info.model, info.vocab_size, info.max_model_len, list(info.tiers)) == ("default", 4096, MAX_LEN,
                                                                                 ["interactive", "batch"])
    assert info.num_pages == 64 and info.attention_backend == "xla" and info.tp == 1


def _stopping(port: int) -> bool:
    """Whether the server on `port` has begun to shut down (health NOT_SERVING, or gone)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=HANG_S).status
        except grpc.RpcError:
            return True
    return status != health_pb2.HealthCheckResponse.SERVING


def test_auth_admission_and_graceful_shutdown(monkeypatch):
    srv = Server(_engine(), ServingConfig(auth_token="s3cret", max_queued_requests=1)).start()
    target = f"127.0.0.1:{srv.port}"
    gate = StepGate(monkeypatch, srv.loop)  # the long stream is held after its first message...
    try:
        with Client(target) as anon:
            with pytest.raises(grpc.RpcError) as err:
                anon.generate("x", max_tokens=2)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                anon.server_info()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Two authorization entries are refused whichever comes last.
            with grpc.insecure_channel(target) as channel:
                stub = pb_grpc.InferenceStub(channel)
                for pair in (("Bearer s3cret", "Bearer wrong"), ("Bearer wrong", "Bearer s3cret")):
                    with pytest.raises(grpc.RpcError) as err:
                        stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=[("authorization", v) for v in pair])
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(target, token="s3cret") as c:
            long = c.generate_stream("def g():", temperature=0, max_tokens=40, ignore_eos=True)
            next(long)
            with pytest.raises(grpc.RpcError) as err:
                c.generate("x", max_tokens=2)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Shutdown drains the stream in flight: it still finishes normally.
            stopper = threading.Thread(target=srv.stop, kwargs=dict(grace=60))
            stopper.start()
            assert wait_for(lambda: _stopping(srv.port))
            gate.release()  # ...until the shutdown is under way
            rest = list(long)
            stopper.join()
            assert rest[-1].finish_reason == "length"
    finally:
        if srv.loop.is_running():
            srv.stop(grace=0)


def test_generated_stubs_are_current(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gen_protos.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for name in ("inference_pb2.py", "inference_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "jinfer" / "serving" / name, os.path.join(ROOT, "jinfer", "serving", name),
                           shallow=False), f"{name} is stale: run python tools/gen_protos.py"


def test_cli_client_streams_and_reports_errors(server):
    tool = os.path.join(ROOT, "tools", "client.py")
    res = subprocess.run([sys.executable, tool, f"--target=127.0.0.1:{server.port}", "--prompt=def f(x):",
                          "--max_tokens=5"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("def f(x):") and "5 tokens, finish=length" in res.stderr
    res = subprocess.run([sys.executable, tool, f"--target=127.0.0.1:{server.port}", "--prompt=x",
                          "--temperature=-2"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "INVALID_ARGUMENT: temperature=-2.0 must be finite and >= 0" in res.stderr


def test_tls(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    srv = Server(_engine(), ServingConfig(tls_cert=str(cert), tls_key=str(key))).start()
    try:
        with Client(f"127.0.0.1:{srv.port}", root_cert=str(cert)) as c:
            assert len(c.generate("def f(x):", temperature=0, max_tokens=3)[0]["token_ids"]) == 3
        with Client(f"127.0.0.1:{srv.port}") as plain:  # plaintext to a TLS port fails, not hangs
            with pytest.raises(grpc.RpcError) as err:
                plain.generate_stream("x", max_tokens=2, timeout=10).next()
            assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        srv.stop(grace=0)
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        ServingConfig(tls_cert=str(cert))


@pytest.mark.parametrize("n, temperature", [(3, 1.0), (3, 0.0), (8, 1.0)])
def test_streams_of_n_samples_end_with_every_sample(client, server, n, temperature):
    """Samples finishing in the same step each get their final message, and the stream ends."""
    outs = client.generate("def f(x):", temperature=temperature, max_tokens=4, ignore_eos=True, n=n, seed=1,
                           timeout=60)  # a lost final message would hang the stream: fail instead
    assert len(outs) == n and all(o["finish_reason"] == "length" and len(o["token_ids"]) == 4 for o in outs)
    assert server.loop.num_outstanding == 0


def test_a_one_ms_deadline_leaves_the_server_serving(client, server):
    """Cancelled while its add is still queued to the engine thread: later requests still run."""
    for _ in range(5):
        with pytest.raises(grpc.RpcError) as err:
            list(client.generate_stream("def g(y):", temperature=0, max_tokens=40, ignore_eos=True, timeout=0.001))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.generate("import os", temperature=0, max_tokens=3, timeout=60)[0]["finish_reason"] in ("length", "stop")
    wait_for(lambda: server.loop.num_outstanding == 0)
    assert server.loop.num_outstanding == 0


def _handled_queued_commands(server) -> None:
    """Returns once the engine loop has handled every command queued before this call (it
    handles them in order; a prefix-cache reset is one more, with a future)."""
    server.loop.reset_prefix_cache().result(HANG_S)


def test_a_cancelled_duplicate_id_neither_kills_the_loop_nor_aborts_the_original(client, server, monkeypatch):
    gate = StepGate(monkeypatch, server.loop)  # the original is held after its first message...
    original = client.generate_stream("class A:", temperature=0, max_tokens=30, ignore_eos=True,
                                      request_id="dup-1", timeout=60)
    first = next(original)  # running
    with pytest.raises(grpc.RpcError) as err:  # refused (id in use) or cancelled: either way not added
        list(client.generate_stream("class B:", temperature=0, max_tokens=3, request_id="dup-1", timeout=0.001))
    assert err.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(grpc.RpcError) as err:
        list(client.generate_stream("class C:", temperature=0, max_tokens=3, request_id="dup-1"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dup-1" in err.value.details()
    # ...until the cancelled stream has ended on the server and its abort (if any) was handled.
    assert wait_for(lambda: server.frontend.num_queued_samples == 1)
    _handled_queued_commands(server)
    gate.release()
    rest = list(original)  # the original runs to its end
    assert rest[-1].finish_reason == "length"
    assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 30
    assert client.generate("import os", temperature=0, max_tokens=3)[0]["finish_reason"] in ("length", "stop")


def test_adds_cancelled_before_the_engine_thread_takes_them_are_dropped_cleanly(client, server, monkeypatch):
    """The race a 1 ms deadline hits, made certain: the add's future is cancelled before the
    engine thread handles it (a new id, and a duplicate of a running id followed by the
    cancelled stream's abort). The loop serves on, and the original request is not aborted."""
    gate = StepGate(monkeypatch, server.loop)  # the original is held after its first message...
    original = client.generate_stream("class A:", temperature=0, max_tokens=30, ignore_eos=True,
                                      request_id="dup-2", timeout=60)  # a dead loop fails, not hangs
    first = next(original)
    for request_id in ("fresh-1", "dup-2"):
        fut = concurrent.futures.Future()
        fut.cancel()
        sink = lambda item: None  # noqa: E731 - the stream that gave up
        server.loop.send(Add("def h():", SamplingParams(temperature=0, max_tokens=3), request_id, 0,
                                       sink, fut, "interactive"))
        server.loop.send(Abort(request_id, sink))
    _handled_queued_commands(server)
    gate.release()  # ...until those were handled
    rest = list(original)
    assert rest[-1].finish_reason == "length"
    assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 30
    out = client.generate("import os", temperature=0, max_tokens=3, timeout=30)
    assert out[0]["finish_reason"] in ("length", "stop")
