"""The gRPC server against clients that misbehave: each test is a bug a hostile-client probe
found, reproduced through the real server as an outside client would, and the guarantees that
must survive it (the server keeps serving, pages go back, other streams are unaffected)."""

import concurrent.futures
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jinfer import TEST_MODEL_DIR
from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.sampling_params import SamplingParams
from jinfer.serving.client import Client
from jinfer.serving.server import Server, ServingConfig
from jinfer.tokenizer import Tokenizer
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


@pytest.fixture
def client(server):
    with Client(f"127.0.0.1:{server.port}") as c:
        yield c


def _still_serves(client):
    assert client.generate("def f(x):", temperature=0, max_tokens=3, timeout=60)[0]["finish_reason"] in ("length",
                                                                                                        "stop")


def _code(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


@pytest.mark.parametrize("n", [5, 20000, 2**31 - 1])
def test_n_above_max_n_is_refused_at_once(client, server, n):
    start = time.monotonic()
    code, details = _code(lambda: client.generate("x", max_tokens=2, n=n, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details == f"n={n} exceeds max_n=4"
    assert time.monotonic() - start < 5
    _still_serves(client)
    assert _settled(server)


def test_admission_counts_samples_and_holds_under_a_burst(client, server):
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

    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], server.frontend.num_queued_samples, server.loop.num_outstanding * 2)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        results = list(pool.map(one, range(40)))
    stop.set()
    watcher.join()
    assert set(results) <= {"ok", "RESOURCE_EXHAUSTED"} and results.count("ok") >= 4, results
    assert peak[0] <= QUEUE
    assert _settled(server)


def test_a_huge_text_prompt_is_tokenized_off_the_engine_thread(client, server):
    """A ~3 MB text prompt (refused for length after tokenizing) must not stall other streams."""
    big = "the quick brown fox jumps over the lazy dog. " * 70000
    tok = server.loop.engine.tokenizer
    start = time.monotonic()
    tok.encode(big)
    encode_s = time.monotonic() - start
    stream = client.generate_stream("class A:", temperature=0, max_tokens=MAX_LEN - 8, ignore_eos=True, timeout=120)
    next(stream)
    arrivals = []

    def drain():
        for _ in stream:
            arrivals.append(time.monotonic())

    reader = threading.Thread(target=drain)
    reader.start()
    code, details = _code(lambda: client.generate(big, max_tokens=2, timeout=120))
    reader.join()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"exceeds max_model_len={MAX_LEN}" in details
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert max(gaps) < max(0.5, encode_s / 2), (max(gaps), encode_s)
    assert _settled(server)


def _raw_generate(server, payload: bytes):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        call = ch.unary_stream("/jinfer.v1.Inference/Generate", request_serializer=None,
                               response_deserializer=None)
        return _code(lambda: list(call(payload, timeout=30)))


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
    code, details = _code(lambda: client.generate("x", max_tokens=2, timeout=30, **params))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details and len(details) < 2048
    _still_serves(client)
    assert _settled(server)


def _health(port):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="jinfer.v1.Inference"),
                                                    timeout=10).status


def _wait_for(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


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
            code, details = _code(lambda: list(stream))
            assert code == grpc.StatusCode.UNAVAILABLE and "stalled" in details
            assert _health(srv.port) == health_pb2.HealthCheckResponse.NOT_SERVING
            code, _ = _code(lambda: c.generate("x", max_tokens=2, timeout=10))
            assert code == grpc.StatusCode.UNAVAILABLE
            engine.step = real_step
            srv.loop.stall_timeout_s = 60.0
            release.set()
            assert _wait_for(lambda: _health(srv.port) == health_pb2.HealthCheckResponse.SERVING)
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
            code, details = _code(lambda: c.generate("class A:", max_tokens=5, timeout=60))
            assert code == grpc.StatusCode.UNAVAILABLE and "engine loop has stopped" in details
            assert _wait_for(lambda: _health(srv.port) == health_pb2.HealthCheckResponse.NOT_SERVING)
            code, _ = _code(lambda: c.generate("x", max_tokens=2, timeout=10))
            assert code == grpc.StatusCode.UNAVAILABLE
            assert c.server_info(timeout=10).max_model_len > 0  # the process still answers
    finally:
        srv.stop(grace=0)


def test_aborting_a_request_of_many_samples_is_linear():
    """2000 samples queued behind 2000 others: one abort settles in one pass (it took 1.4 s
    when each sample was looked up by a field-by-field scan of the waiting queue)."""
    engine = Engine(load_hf_model(TEST_MODEL_DIR), Tokenizer.from_dir(TEST_MODEL_DIR),
                    CacheConfig(page_size=16, num_pages=256),
                    SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=64, max_model_len=MAX_LEN))
    params = SamplingParams(n=2000, max_tokens=4, temperature=1.0)
    engine.add_request("hello", params, request_id="a")
    for _ in range(3):
        engine.step()
    engine.add_request("world", params, request_id="b")
    for _ in range(3):
        engine.step()
    start = time.perf_counter()
    assert engine.abort("b")
    assert time.perf_counter() - start < 0.25
    assert engine.abort("a") and not engine.has_unfinished()
