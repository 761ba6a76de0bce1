"""A step that cannot be built because of one request fails that request alone.

Values are checked at the door (SamplingParams), so no client can send such a request; these
tests slip one past the door (as a validation gap would) and check the net behind it: the
step is rolled back, the bad request ends with an error, and every other stream of the same
server goes on to the same tokens it gets alone."""

import queue

import pytest

from jinfer import TEST_MODEL_DIR
from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.engine import Engine
from jinfer.errors import StepFailed
from jinfer.loader.hf import load_hf_model
from jinfer.sampling_params import SamplingParams
from jinfer.serving.client import Client
from jinfer.serving.server import Server, ServingConfig
from jinfer.tokenizer import Tokenizer
from tests.serving_util import settled

VICTIM = dict(temperature=0, max_tokens=40, ignore_eos=True)


def _engine():
    return Engine(load_hf_model(TEST_MODEL_DIR), Tokenizer.from_dir(TEST_MODEL_DIR),
                  CacheConfig(page_size=16, num_pages=48),
                  SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=96))


def _poisoned(**values) -> SamplingParams:
    """Params the door would refuse, built as if it had missed them."""
    params = SamplingParams(temperature=1.0, max_tokens=8)
    for name, value in values.items():
        object.__setattr__(params, name, value)
    return params


@pytest.fixture(scope="module")
def server():
    srv = Server(_engine(), ServingConfig(tiers=("interactive",))).start()
    yield srv
    srv.stop(grace=1)


def test_the_engine_rolls_back_a_step_it_cannot_build_and_names_the_request():
    engine = _engine()
    alone = engine.generate(["def f(x):"], SamplingParams(**VICTIM))[0].token_ids
    engine.add_request("def f(x):", SamplingParams(**VICTIM), request_id="victim")
    engine.step()
    engine.add_request([5, 6, 7], _poisoned(top_k=2**40), request_id="bad")
    with pytest.raises(StepFailed) as failed:
        engine.step()
    assert list(failed.value.culprits) == ["bad"] and isinstance(failed.value.cause, OverflowError)
    engine.abort("bad")
    tokens = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step() if out.request_id == "victim" for t in out.new_token_ids]
    assert tokens == alone
    load = engine.load()
    assert load.running == load.waiting == 0 and load.free_pages + load.cached_pages == load.num_pages


def test_through_the_server_a_request_the_step_cannot_hold_fails_alone(server):
    with Client(f"127.0.0.1:{server.port}") as c:
        alone = c.generate("def f(x):", **VICTIM)[0]["token_ids"]
        stream = c.generate_stream("def f(x):", **VICTIM)
        tokens = list(next(stream).token_ids)  # the victim is running
        got = queue.SimpleQueue()
        accepted = server.loop.submit([5, 6, 7], _poisoned(top_k=2**40), "bad", 0, got.put)
        assert accepted.result(timeout=60) == "bad"
        failure = got.get(timeout=120)
        assert isinstance(failure, Exception) and "could not be stepped" in str(failure)
        assert "other requests were not affected" in str(failure)
        for msg in stream:
            tokens += msg.token_ids
        assert tokens == alone
        # ... and the server serves on, to the same tokens.
        assert c.generate("def f(x):", **VICTIM)[0]["token_ids"] == alone
    assert settled(server)


def test_a_rolled_back_plan_takes_back_the_samples_it_forked():
    """A culprit of n=2 whose prompt fills a page: the failed plan forked its second sample onto
    pages the step was to write. Rolled back and aborted, those pages must not reach the prefix
    cache, or the next request with that prompt starts from K/V never written."""
    prompt = list(range(100, 125))  # 25 tokens: one full shared page of 16
    fresh = _engine().generate([prompt], SamplingParams(**VICTIM))[0].token_ids
    engine = _engine()
    engine.add_request(prompt, _poisoned(top_k=2**40, n=2), request_id="bad")
    with pytest.raises(StepFailed):
        engine.step()
    engine.abort("bad")
    load = engine.load()
    assert load.running == load.waiting == 0 and load.free_pages + load.cached_pages == load.num_pages
    assert engine.generate([prompt], SamplingParams(**VICTIM))[0].token_ids == fresh
