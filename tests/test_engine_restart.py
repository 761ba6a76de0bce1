"""The engine loop's supervisor, through the real server: a loop that crashes fails what it held
with a clear UNAVAILABLE, restarts on a fresh engine state and serves on, counted in /metrics;
one that keeps crashing stays dead. And a call that ends before its status goes out (deadline
passed, client gone) is no error in the server's log."""

import asyncio
import concurrent.futures
import logging
import random
import re
import urllib.request

import grpc
import httpx
import pytest
from grpc._cython import cygrpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jinfer import TEST_MODEL_DIR
from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.serving.client import Client
from jinfer.serving.engine_loop import MAX_RESTARTS, Health
from jinfer.serving.grpc_host import abort
from jinfer.serving.server import Server, ServingConfig
from jinfer.tokenizer import Tokenizer
from tests.serving_util import rpc_error, settled, wait_for

MAX_LEN = 96
PROMPT = "def fibonacci(n):"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _engine():
    return Engine(load_hf_model(TEST_MODEL_DIR), Tokenizer.from_dir(TEST_MODEL_DIR),
                  CacheConfig(page_size=16, num_pages=64),
                  SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=MAX_LEN))


def _config(**kw):
    return ServingConfig(metrics_port=0, engine_stall_timeout_s=60.0, **kw)


@pytest.fixture(scope="module")
def server():
    srv = Server(_engine(), _config(http_port=0, max_queued_requests=4)).start()
    yield srv
    srv.stop(grace=1)



def _health(port):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="jinfer.v1.Inference"),
                                                    timeout=10).status


def _metrics(srv) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


def test_a_crashed_loop_fails_its_streams_and_serves_again_on_a_fresh_engine(server, client, monkeypatch):
    want = client.generate(PROMPT, temperature=0, max_tokens=8)[0]["token_ids"]
    engine = server.loop.engine
    assert engine.load().cached_pages > 0  # the prompt's pages, for the restart to drop
    # The fault: the metrics listener raises on the engine thread, outside any step, once the
    # victim is mid-stream (so a stream is surely in flight when the loop crashes).
    real_on_outputs = server.metrics.on_outputs

    def on_outputs(outputs, now=None):
        if any(o.request_id == "victim" and len(o.token_ids) >= 2 for o in outputs):
            monkeypatch.setattr(server.metrics, "on_outputs", real_on_outputs)
            raise RuntimeError("injected fault")
        real_on_outputs(outputs, now)

    monkeypatch.setattr(server.metrics, "on_outputs", on_outputs)
    long = dict(temperature=0, max_tokens=MAX_LEN - 16, ignore_eos=True, timeout=60)
    bystander = client.generate_stream("import os\n", request_id="bystander", **long)
    next(bystander)
    victim = client.generate_stream(PROMPT, request_id="victim", **long)
    for stream in (victim, bystander):
        code, details = rpc_error(lambda: list(stream))
        assert code == grpc.StatusCode.UNAVAILABLE, details
        assert "engine loop restarted" in details and "RuntimeError('injected fault')" in details
    assert wait_for(lambda: server.loop.restarts == 1)
    load = engine.load()
    assert (load.running, load.waiting, load.cached_pages, load.free_pages) == (0, 0, 0, load.num_pages)
    assert wait_for(lambda: _health(server.port) == SERVING)
    assert httpx.get(f"http://127.0.0.1:{server.http_port}/health", timeout=10).status_code == 200
    assert server.loop.health() is Health.SERVING
    assert client.generate(PROMPT, temperature=0, max_tokens=8)[0]["token_ids"] == want
    assert _metrics(server)['jinfer_engine_restarts_total{reason="RuntimeError"}'] == 1
    assert settled(server)


def test_a_loop_that_keeps_crashing_stays_dead_instead_of_spinning(caplog):
    srv = Server(_engine(), _config())

    def update_engine(engine, now=None):
        raise RuntimeError("always broken")

    srv.metrics.update_engine = update_engine  # runs each time the loop goes idle, its first act
    srv.start()
    try:
        assert wait_for(lambda: srv.loop.health() is Health.DEAD)
        assert srv.loop.restarts == MAX_RESTARTS
        assert _metrics(srv)['jinfer_engine_restarts_total{reason="RuntimeError"}'] == MAX_RESTARTS
        assert any(r.levelno == logging.ERROR and "not restarting it" in r.getMessage() for r in caplog.records)
        assert wait_for(lambda: _health(srv.port) == NOT_SERVING)
        with Client(f"127.0.0.1:{srv.port}") as c:
            code, details = rpc_error(lambda: c.generate("x", max_tokens=2, timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE and "dead" in details
    finally:
        srv.stop(grace=0)


class _EndedCall:
    """A servicer context whose call ended (deadline passed) before its status could be sent:
    its abort fails as gRPC's does then, with the core's ExecuteBatchError."""

    async def abort(self, code, details):
        raise cygrpc.ExecuteBatchError('Failed "execute_batch"')

    def time_remaining(self):
        return 0

    def done(self):
        return False

    def cancelled(self):
        return False


def test_an_abort_the_call_outlived_is_logged_at_debug_and_ends_the_call_as_cancelled(caplog):
    caplog.set_level(logging.DEBUG, logger="jinfer.serving.grpc_host")
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(abort(_EndedCall(), grpc.StatusCode.RESOURCE_EXHAUSTED, "server is full"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("RESOURCE_EXHAUSTED not sent, its deadline had passed" in r.getMessage() for r in caplog.records)


def test_calls_whose_deadline_passes_log_no_error_and_the_server_keeps_serving(server, client, caplog):
    """Deadlines of 1-30 ms against a queue of 4: they pass while a request is refused, queued,
    tokenized or streaming. None of it is an ERROR in the log."""
    caplog.set_level(logging.WARNING)
    prompts = ["", "x" * 3000, PROMPT, [5] * (MAX_LEN + 1)]  # empty, long to tokenize, fine, too long

    def one(i):
        rnd = random.Random(i)
        try:
            client.generate(rnd.choice(prompts), max_tokens=rnd.randint(1, 40), timeout=rnd.uniform(0.001, 0.03))
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = set(pool.map(one, range(400)))
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
    assert client.generate(PROMPT, temperature=0, max_tokens=3, timeout=60)[0]["finish_reason"] == "length"
    assert settled(server)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
