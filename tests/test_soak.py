"""The soak (harness/soak.py): concurrent well-behaved and hostile clients; every call ends
as its action allows, and the server settles with no page held. A short run in the default set,
the full one (200 streams, 60 s, a server process whose memory is watched) in the slow set."""

import asyncio
import itertools
import os
import types

import pytest

from entrypoints.process import ServerProcess
from harness import soak as soak_module
from harness.soak import soak
from jinfer import TEST_MODEL_DIR
from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.serving.server import Server, ServingConfig
from jinfer.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_short_soak_ends_every_call_as_allowed_and_leaks_no_page(monkeypatch):
    engine = Engine(load_hf_model(TEST_MODEL_DIR), Tokenizer.from_dir(TEST_MODEL_DIR),
                    CacheConfig(page_size=16, num_pages=64),
                    SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=96))
    engine.runner.warmup()  # compiling buckets mid-soak would leave little time for serving
    srv = Server(engine, ServingConfig(max_queued_requests=24, max_n=4, max_request_bytes=8 << 20)).start()
    # A run of 600 calls, not of some seconds (which a loaded machine fills with fewer): the
    # soak's clock moves on 10 ms each time it is read, once by each worker before each call.
    ticks = itertools.count()
    monkeypatch.setattr(soak_module, "time", types.SimpleNamespace(monotonic=lambda: next(ticks) * 0.01))
    try:
        report = asyncio.run(soak(f"127.0.0.1:{srv.port}", concurrency=40, duration_s=6, seed=1))
    finally:
        srv.stop(grace=0)
    print(report.table())
    assert not report.unexpected, report.table()
    assert report.settled, report.table()
    ok = sum(v for k, v in report.outcomes.items() if k.endswith(": OK"))
    bad = sum(v for k, v in report.outcomes.items() if k.startswith("bad:"))
    assert ok > 10 and bad > 3 and report.tokens > 0, report.table()
    assert any(k.endswith("RESOURCE_EXHAUSTED") for k in report.outcomes), report.table()  # admission was hit


@pytest.mark.slow
def test_soak_200_streams_for_60_s_against_a_server_process():
    args = [f"--config={os.path.join(ROOT, 'configs', 'test_5m.py')}", "--config.serving.port=0",
            "--config.serving.metrics_port=0", "--config.engine.warmup=True", "--config.engine.compilation_cache=",
            "--config.serving.max_request_bytes=8388608", "--config.serving.max_n=4"]
    with ServerProcess(args) as proc:
        proc.wait_ready(600)
        report = asyncio.run(soak(proc.target, concurrency=200, duration_s=60, seed=0,
                                  server_pid=proc.ports["pid"]))
    print(report.table())
    assert not report.unexpected and report.settled, report.table()
    assert report.rss_growth_mib < 100, report.table()
