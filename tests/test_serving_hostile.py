"""The gRPC server against clients that misbehave: each test is a bug a hostile-client probe
found, reproduced through the real server as an outside client would, and the guarantees that
must survive it (the server keeps serving, pages go back, other streams are unaffected)."""

import concurrent.futures
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jinfer import TEST_MODEL_DIR
from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.sampling_params import SamplingParams
from jinfer.serving.client import Client
from jinfer.serving.server import Server, ServingConfig
from jinfer.tokenizer import Tokenizer
from tests.serving_util import HANG_S, StepGate, rpc_error, wait_for
from tests.serving_util import settled as _settled

MAX_LEN = 96
QUEUE = 8


def _engine():
    return Engine(load_hf_model(TEST_MODEL_DIR), Tokenizer.from_dir(TEST_MODEL_DIR),
                  CacheConfig(page_size=16, num_pages=64),
                  SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=MAX_LEN))


@pytest.fixture(scope="module")
def server():
    srv = Server(_engine(), ServingConfig(tiers=("interactive", "batch"), max_request_bytes=8 << 20,
                                          max_queued_requests=QUEUE, max_n=4)).start()
    yield srv
    srv.stop(grace=1)


def _still_serves(client):
    assert client.generate("def f(x):", temperature=0, max_tokens=3, timeout=60)[0]["finish_reason"] in ("length",
                                                                                                        "stop")



@pytest.mark.parametrize("n", [5, 20000, 2**31 - 1])
def test_n_above_max_n_is_refused_at_once(client, server, monkeypatch, n):
    work = []  # what the server did for the request: tokenizing it, handing it to the engine
    encode, submit = server.frontend.encode, server.loop.submit
    monkeypatch.setattr(server.frontend, "encode", lambda *a, **kw: work.append("encode") or encode(*a, **kw))
    monkeypatch.setattr(server.loop, "submit", lambda *a, **kw: work.append("submit") or submit(*a, **kw))
    code, details = rpc_error(lambda: client.generate("x", max_tokens=2, n=n, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details == f"n={n} exceeds max_n=4"
    assert work == []  # at once: refused at the door, before any work for its n samples
    _still_serves(client)
    assert _settled(server)


def test_admission_counts_samples_and_holds_under_a_burst(client, server, monkeypatch):
    """A simultaneous burst of 40 requests (n=2) against room for 8 samples: at most 4 are
    admitted at any time, the rest are RESOURCE_EXHAUSTED, and every admitted one completes."""
    barrier = threading.Barrier(40)

    def one(i):
        barrier.wait()
        try:
            outs = client.generate(f"def f{i}(x):", temperature=0, max_tokens=20, ignore_eos=True, n=2, timeout=120)
            return "ok" if len(outs) == 2 and all(len(o["token_ids"]) == 20 for o in outs) else "short"
        except grpc.RpcError as e:
            return e.code().name

    # The counts, read where they rise (no sampling that a busy machine could miss): samples
    # admitted, as the frontend admits (on the server's event loop, where they are also
    # released), and requests in the engine, as each is added (on the engine thread).
    peak = [0]
    admit = server.frontend._admit

    def admitted(n):
        admit(n)
        peak[0] = max(peak[0], server.frontend.num_queued_samples)

    class Added:
        @staticmethod
        def on_admit(request_id, tier, n):
            peak[0] = max(peak[0], server.loop.num_outstanding * 2)

    monkeypatch.setattr(server.frontend, "_admit", admitted)
    monkeypatch.setattr(server.loop, "listeners", server.loop.listeners + (Added,))
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        results = list(pool.map(one, range(40)))
    assert set(results) <= {"ok", "RESOURCE_EXHAUSTED"} and results.count("ok") >= 4, results
    assert 0 < peak[0] <= QUEUE
    assert _settled(server)


def test_a_long_text_prompt_is_tokenized_without_stalling_other_streams(client, server, monkeypatch):
    """A text prompt short enough in bytes to be tokenized, too long in tokens (refused after
    tokenizing), must not stall other streams: while it is in the tokenizer, held there until
    another stream has had more tokens, that stream goes on. Tokenizing on the engine thread or
    on the server's event loop would hold that stream too, and the wait would time out."""
    tokenizer = server.frontend.tokenizer
    sentence = "the quick brown fox jumps over the lazy dog. "
    long = sentence * ((MAX_LEN - 8) * tokenizer.max_bytes_per_token // len(sentence))  # within the byte bound
    gate = StepGate(monkeypatch, server.loop)  # the stream is held after its first message...
    more, tokenized = threading.Event(), []
    encode = tokenizer.encode

    def held(text, **kw):
        if text == long:
            gate.release()  # ...until the long prompt is in the tokenizer
            tokenized.append((threading.current_thread(), more.wait(HANG_S)))
        return encode(text, **kw)

    monkeypatch.setattr(tokenizer, "encode", held)
    stream = client.generate_stream("class A:", temperature=0, max_tokens=MAX_LEN - 8, ignore_eos=True, timeout=120)
    tokens = list(next(stream).token_ids)

    def drain():
        for msg in stream:
            tokens.extend(msg.token_ids)
            more.set()

    reader = threading.Thread(target=drain)
    reader.start()
    code, details = rpc_error(lambda: client.generate(long, max_tokens=2, timeout=120))
    gate.release()  # (a no-op once the long prompt was tokenized)
    reader.join()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"exceeds max_model_len={MAX_LEN}" in details
    (thread, went_on), = tokenized
    assert went_on and thread is not server.loop.thread  # the stream got tokens while it was tokenized
    assert len(tokens) == MAX_LEN - 8
    assert _settled(server)


def _raw_generate(server, payload: bytes):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        call = ch.unary_stream("/jinfer.v1.Inference/Generate", request_serializer=None,
                               response_deserializer=None)
        return rpc_error(lambda: list(call(payload, timeout=30)))


@pytest.mark.parametrize("payload", [
    b"\x0a\x02\xff\xfe",  # text = invalid UTF-8
    b"\x0a\x03\xed\xa0\x80",  # text = a lone surrogate, UTF-8-encoded
    b"\x0a\x10ab",  # text field cut short
    b"\xff\xff\xff\xff",  # not protobuf at all
])
def test_undecodable_bytes_are_invalid_argument(server, client, payload):
    code, details = _raw_generate(server, payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request could not be decoded")
    _still_serves(client)


@pytest.mark.parametrize("params, message", [
    (dict(tier="g" * 100_000), "unknown tier='gggggggg"),
    (dict(stop=["s" * (2 << 20), ""]), "stop[1] is an empty string"),
    (dict(request_id="r/" + "x" * 100_000), "is already in use or contains '/'"),
    (dict(temperature=float("inf")), "temperature=inf must be finite and >= 0"),
])
def test_long_bad_values_are_quoted_short_and_stay_invalid_argument(client, server, params, message):
    code, details = rpc_error(lambda: client.generate("x", max_tokens=2, timeout=30, **params))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details and len(details) < 2048
    _still_serves(client)
    assert _settled(server)


def _health(port):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="jinfer.v1.Inference"),
                                                    timeout=HANG_S).status


def test_a_stalled_engine_turns_health_not_serving_and_fails_streams_until_it_recovers():
    srv = Server(_engine(), ServingConfig(engine_stall_timeout_s=60.0)).start()
    engine, release = srv.loop.engine, threading.Event()
    real_step = engine.step

    def stuck_step():
        release.wait()
        return real_step()

    try:
        with Client(f"127.0.0.1:{srv.port}") as c:
            _still_serves(c)
            srv.loop.stall_timeout_s = 1.0  # here, not at start: a step that compiles may take longer
            engine.step = stuck_step
            stream = c.generate_stream("class A:", temperature=0, max_tokens=20, timeout=60)
            code, details = rpc_error(lambda: list(stream))
            assert code == grpc.StatusCode.UNAVAILABLE and "stalled" in details
            assert _health(srv.port) == health_pb2.HealthCheckResponse.NOT_SERVING
            code, _ = rpc_error(lambda: c.generate("x", max_tokens=2, timeout=HANG_S))
            assert code == grpc.StatusCode.UNAVAILABLE
            engine.step = real_step
            srv.loop.stall_timeout_s = 60.0
            release.set()
            assert wait_for(lambda: _health(srv.port) == health_pb2.HealthCheckResponse.SERVING)
            _still_serves(c)
            assert _settled(srv)
    finally:
        release.set()
        srv.stop(grace=0)


def test_a_dead_engine_loop_fails_streams_and_health_instead_of_hanging():
    srv = Server(_engine(), ServingConfig(engine_stall_timeout_s=60.0)).start()
    engine = srv.loop.engine

    def fatal_step():
        raise KeyboardInterrupt("simulated fatal error in the engine thread")

    try:
        with Client(f"127.0.0.1:{srv.port}") as c:
            _still_serves(c)
            engine.step = fatal_step
            code, details = rpc_error(lambda: c.generate("class A:", max_tokens=5, timeout=60))
            assert code == grpc.StatusCode.UNAVAILABLE and "engine loop has stopped" in details
            assert wait_for(lambda: _health(srv.port) == health_pb2.HealthCheckResponse.NOT_SERVING)
            code, _ = rpc_error(lambda: c.generate("x", max_tokens=2, timeout=HANG_S))
            assert code == grpc.StatusCode.UNAVAILABLE
            assert c.server_info(timeout=HANG_S).max_model_len > 0  # the process still answers
    finally:
        srv.stop(grace=0)


def test_aborting_a_request_of_many_samples_is_linear():
    """2000 samples queued behind 2000 others: one abort settles in one pass, its work linear in
    the samples (it took 1.4 s when each sample was looked up by a field-by-field scan of the
    waiting queue: a Python __eq__ call per queued request per sample)."""
    engine = Engine(load_hf_model(TEST_MODEL_DIR), Tokenizer.from_dir(TEST_MODEL_DIR),
                    CacheConfig(page_size=16, num_pages=256),
                    SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=64, max_model_len=MAX_LEN),
                    options=EngineOptions(min_token_bucket=512))  # one bucket: compiling more was most of the time
    params = SamplingParams(n=2000, max_tokens=4, temperature=1.0)
    engine.add_request("hello", params, request_id="a")
    for _ in range(3):
        engine.step()
    engine.add_request("world", params, request_id="b")
    for _ in range(3):
        engine.step()
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += 1

    sys.setprofile(count)  # every Python and C call made while aborting, whatever the machine's speed
    try:
        aborted = engine.abort("b")
    finally:
        sys.setprofile(None)
    # One pass: about 26 calls a sample; one lookup per sample in the 4000-long queue was ~4M.
    assert aborted and calls < 100 * 2000, calls
    assert engine.abort("a") and not engine.has_unfinished()
