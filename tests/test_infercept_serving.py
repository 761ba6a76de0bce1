"""Tool calls over the real server (gRPC, as an outside client): a request pauses at one of its
intercept_token_ids, its stream ends with paused set, Resume continues it with the tool's
output exactly as one run over prompt + output + tool output; bad resumes are clear errors
that change nothing; a paused request nobody resumes is aborted after pause_timeout_s."""

import grpc
import httpx
import pytest

from jinfer import TEST_MODEL_DIR
from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.sampling_params import SamplingParams
from jinfer.serving.client import Client
from jinfer.serving.server import Server, ServingConfig
from jinfer.tokenizer import Tokenizer
from scheduler.infercept.policies import SwapAll
from tests.serving_util import rpc_error, settled, wait_for

PROMPT = [5, 17, 230, 41, 9, 77, 120, 33, 64, 8]
TOOL = [300, 301, 302, 303, 304]


def _engine(**kw):
    return Engine(load_hf_model(TEST_MODEL_DIR), Tokenizer.from_dir(TEST_MODEL_DIR),
                  CacheConfig(page_size=16, num_pages=64),
                  SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=96), **kw)


@pytest.fixture(scope="module")
def reference():
    """The model's greedy run of PROMPT, a token of it to pause at (once), and the engine."""
    eng = _engine()
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = eng.generate([PROMPT], greedy)[0].token_ids
    for k in range(2, 10):
        after = eng.generate([PROMPT + full[:k + 1] + TOOL], greedy)[0].token_ids
        if full[k] not in full[:k] and full[k] not in after:
            return full, full[k], eng
    raise AssertionError("no token pauses once")


@pytest.fixture(scope="module")
def server():
    srv = Server(_engine(pause_policy=SwapAll()), ServingConfig(pause_timeout_s=600.0, http_port=0)).start()
    yield srv
    srv.stop(grace=1)


@pytest.fixture
def client(server):
    with Client(f"127.0.0.1:{server.port}") as c:
        yield c


def test_a_tool_call_pauses_the_stream_and_resume_continues_it(server, client, reference):
    full, marker, eng = reference
    first = client.generate(PROMPT, temperature=0, max_tokens=12, ignore_eos=True, intercept_token_ids=[marker],
                            request_id="tool-1")[0]
    assert first["paused"] and first["finish_reason"] == "" and first["token_ids"][-1] == marker
    assert first["token_ids"] == full[:len(first["token_ids"])]
    assert wait_for(lambda: server.loop.engine.num_paused() == 1)
    second = client.resume("tool-1", TOOL)
    assert second["finish_reason"] == "length" and not second["paused"]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert second["token_ids"] == eng.generate([PROMPT + first["token_ids"] + TOOL], greedy)[0].token_ids
    stats = server.loop.engine.scheduler.pause_stats
    assert settled(server) and stats.paused == stats.resumed >= 1
    # Text tool output, tokenized without special tokens.
    client.generate(PROMPT, temperature=0, max_tokens=12, ignore_eos=True, intercept_token_ids=[marker],
                    request_id="tool-2")
    text = " result: 42"
    got = client.resume("tool-2", text)
    ids = Tokenizer.from_dir(TEST_MODEL_DIR).encode(text, add_special_tokens=False)
    assert got["token_ids"] == eng.generate([PROMPT + first["token_ids"] + ids], greedy)[0].token_ids
    assert settled(server)


def test_bad_resumes_are_clear_errors_and_change_nothing(server, client, reference):
    full, marker, _ = reference
    assert rpc_error(lambda: client.resume("nobody", TOOL))[0] == grpc.StatusCode.NOT_FOUND
    code, details = rpc_error(lambda: client.resume("", TOOL))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in details
    code, details = rpc_error(lambda: client.generate(PROMPT, n=2, intercept_token_ids=[marker]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "n=1" in details
    code, details = rpc_error(lambda: client.generate(PROMPT, intercept_token_ids=[-1]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "intercept_token_ids" in details
    client.generate(PROMPT, temperature=0, max_tokens=12, ignore_eos=True, intercept_token_ids=[marker],
                    request_id="tool-3")
    code, details = rpc_error(lambda: client.resume("tool-3", [1] * 200))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_model_len" in details
    code, details = rpc_error(lambda: client.resume("tool-3", [10**6]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in details
    assert client.resume("tool-3", TOOL)["finish_reason"] == "length"  # still paused until then
    assert rpc_error(lambda: client.resume("tool-3", TOOL))[0] == grpc.StatusCode.NOT_FOUND  # finished now
    assert settled(server)


def test_a_paused_request_nobody_resumes_is_aborted_after_the_timeout(reference):
    _, marker, _ = reference
    srv = Server(_engine(), ServingConfig(pause_timeout_s=0.2)).start()
    try:
        with Client(f"127.0.0.1:{srv.port}") as c:
            out = c.generate(PROMPT, temperature=0, max_tokens=12, ignore_eos=True, intercept_token_ids=[marker],
                             request_id="left")[0]
            assert out["paused"]
            assert wait_for(lambda: srv.loop.engine.num_paused() == 0 and not srv.loop.engine.is_unfinished("left"))
            assert rpc_error(lambda: c.resume("left", TOOL))[0] == grpc.StatusCode.NOT_FOUND
            assert settled(srv)
            assert c.generate(PROMPT, temperature=0, max_tokens=4)[0]["finish_reason"] == "length"  # serving on
    finally:
        srv.stop(grace=1)


def test_the_http_api_pauses_a_completion_and_resumes_it(server, reference):
    full, marker, eng = reference
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=60) as http:
        first = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                                   "ignore_eos": True, "intercept_token_ids": [marker],
                                                   "return_token_ids": True}).json()
        choice = first["choices"][0]
        assert choice["finish_reason"] == "intercept" and choice["token_ids"][-1] == marker
        got = http.post(f"/v1/completions/{first['id']}/resume",
                        json={"tool_output": TOOL, "return_token_ids": True}).json()["choices"][0]
        assert got["finish_reason"] == "length"
        assert got["token_ids"] == eng.generate([PROMPT + choice["token_ids"] + TOOL], greedy)[0].token_ids
        # Streamed, and errors as OpenAI's bodies.
        first = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                                   "ignore_eos": True, "intercept_token_ids": [marker]}).json()
        with http.stream("POST", f"/v1/completions/{first['id']}/resume",
                         json={"tool_output": TOOL, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' in events[-2]
        missing = http.post(f"/v1/completions/{first['id']}/resume", json={"tool_output": TOOL})
        assert missing.status_code == 404 and "is paused" in missing.json()["error"]["message"]
        bad = http.post("/v1/completions/cmpl-x/resume", json={"tool_output": 5})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_output"
    assert settled(server)


def test_the_server_keeps_at_most_max_paused_requests(reference):
    _, marker, _ = reference
    srv = Server(_engine(), ServingConfig(max_paused_requests=1)).start()
    try:
        with Client(f"127.0.0.1:{srv.port}") as c:
            for rid in ("one", "two"):
                assert c.generate(PROMPT, temperature=0, max_tokens=12, ignore_eos=True, intercept_token_ids=[marker],
                                  request_id=rid)[0]["paused"]
            assert rpc_error(lambda: c.resume("one", TOOL))[0] == grpc.StatusCode.NOT_FOUND  # made room for two
            assert c.resume("two", TOOL)["finish_reason"] == "length"
            assert settled(srv)
    finally:
        srv.stop(grace=1)


def test_an_intercept_string_pauses_over_grpc_and_http(server, client, reference):
    full, _, eng = reference
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    text = eng.generate([PROMPT], greedy)[0].text
    mark = next(text[k - 2:k] for k in range(2, len(text)) if text[k - 2:k].strip())
    got = client.generate(PROMPT, temperature=0, max_tokens=12, ignore_eos=True, intercept=[mark],
                          request_id="str-1")[0]
    assert got["paused"] and mark in got["text"] and got["token_ids"] == full[:len(got["token_ids"])]
    second = client.resume("str-1", TOOL)
    want = eng.generate([PROMPT + got["token_ids"] + TOOL], greedy)[0].token_ids
    assert second["token_ids"] == want[:len(second["token_ids"])]
    while second["paused"]:  # the string came again: finish it
        second = client.resume("str-1", [])
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=60) as http:
        body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "intercept": mark}
        first = http.post("/v1/completions", json=body).json()
        assert first["choices"][0]["finish_reason"] == "intercept" and mark in first["choices"][0]["text"]
        again = http.post(f"/v1/completions/{first['id']}/resume", json={"tool_output": TOOL})
        while again.json()["choices"][0]["finish_reason"] == "intercept":
            again = http.post(f"/v1/completions/{first['id']}/resume", json={"tool_output": []})
        assert again.json()["choices"][0]["finish_reason"] == "length"
        bad = http.post("/v1/completions", json={**body, "intercept": [""]})
        assert bad.status_code == 400 and "intercept" in bad.json()["error"]["message"]
    assert settled(server)
