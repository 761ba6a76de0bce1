"""The OpenAI-compatible HTTP API through a real server on loopback ports: the official `openai`
client for what works, plain httpx for what must be refused, and the gRPC API of the same
server (or Engine.generate) for what the tokens should be."""

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading

import httpx
import openai
import pytest

from harness import benchmark as bm
from jinfer import TEST_MODEL_DIR
from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.sampling_params import SamplingParams
from jinfer.serving.client import Client
from jinfer.serving.engine_loop import Health
from jinfer.serving.openai import HttpHost
from jinfer.serving.server import Server, ServingConfig
from jinfer.tokenizer import Tokenizer
from scheduler.simulation import workloads as w
from tests.serving_util import HANG_S, StepGate, wait_for
from tests.serving_util import settled as _settled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LEN = 96
TOKEN = "s3cret"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]


def _engine(model_dir):
    # One token bucket (16): one compiled step program per engine keeps the file fast.
    return Engine(load_hf_model(model_dir), Tokenizer.from_dir(model_dir), CacheConfig(page_size=16, num_pages=64),
                  SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=8, max_model_len=MAX_LEN))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The test model with a chat template (it ships none)."""
    path = tmp_path_factory.mktemp("model") / "chat_model"
    shutil.copytree(TEST_MODEL_DIR, path)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return str(path)


@pytest.fixture(scope="module")
def server(model_dir):
    srv = Server(_engine(model_dir), ServingConfig(
        http_port=0, tiers=("interactive", "batch"), auth_token=TOKEN, max_request_bytes=8192,
        max_queued_requests=8, max_n=4, model_name="default")).start()
    yield srv
    srv.stop(grace=1)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.from_dir(model_dir)


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=TOKEN, max_retries=0,
                       timeout=60) as c:
        yield c


@pytest.fixture
def grpc_client(server):
    with Client(f"127.0.0.1:{server.port}", token=TOKEN) as c:
        yield c


@pytest.fixture
def http(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", headers={"authorization": f"Bearer {TOKEN}"},
                      timeout=60) as c:
        yield c


def _ids(choice):
    return choice.model_extra["token_ids"]


def test_models_lists_the_served_model_and_health_needs_no_token(client, server):
    card = client.models.list().data[0]
    assert (card.id, card.owned_by) == ("default", "jinfer")
    assert card.model_extra == {"max_model_len": MAX_LEN, "vocab_size": 4096, "tiers": ["interactive", "batch"]}
    assert client.models.retrieve("default").id == "default"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    response = httpx.get(f"http://127.0.0.1:{server.http_port}/health")
    assert response.status_code == 200 and response.json() == {"status": "serving"}


def test_completion_tokens_equal_the_grpc_api(client, grpc_client, tokenizer):
    prompt = "def fibonacci(n):"
    got = client.completions.create(model="default", prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"return_token_ids": True})
    want = grpc_client.generate(prompt, temperature=0, max_tokens=12)[0]
    choice = got.choices[0]
    assert (_ids(choice), choice.text, choice.finish_reason) == (want["token_ids"], want["text"], "length")
    prompt_len = len(tokenizer.encode(prompt))
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (
        prompt_len, 12, prompt_len + 12)
    by_ids = client.completions.create(model="default", prompt=tokenizer.encode(prompt), max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == want["text"]

    sampled = dict(temperature=0.8, top_p=0.95, seed=7, max_tokens=10, n=2)
    got = client.completions.create(model="default", prompt=prompt, logprobs=1,
                                    extra_body={"top_k": 50, "tier": "batch", "return_token_ids": True}, **sampled)
    want = grpc_client.generate(prompt, top_k=50, logprobs=True, tier="batch", **sampled)
    assert [c.index for c in got.choices] == [0, 1]
    assert [_ids(c) for c in got.choices] == [x["token_ids"] for x in want]
    assert [c.text for c in got.choices] == [x["text"] for x in want]
    for c, x in zip(got.choices, want):
        assert c.logprobs.token_logprobs == pytest.approx(x["logprobs"], abs=1e-6)
        assert c.logprobs.tokens == [tokenizer.decode([t], skip_special_tokens=False) for t in x["token_ids"]]
        assert [list(top) for top in c.logprobs.top_logprobs] == [[t] for t in c.logprobs.tokens]
    assert got.usage.completion_tokens == 20 and got.usage.prompt_tokens == prompt_len


def _refuses_connections(port: int) -> bool:
    """Whether the port takes no new connection: refused, or reset while connecting (the
    listener closed with the attempt in its backlog)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=HANG_S).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    return False


def test_engine_generate_and_the_http_api_of_a_second_server_agree_and_stop_is_graceful(model_dir, monkeypatch):
    engine = _engine(model_dir)
    params = SamplingParams(temperature=0.8, top_k=50, seed=7, max_tokens=10, n=2)
    want = engine.generate(["import os\n"], params)
    srv = Server(engine, ServingConfig(http_port=0)).start()
    gate = stopper = None
    try:
        assert srv.http_port not in (None, 0, srv.port)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="unused", max_retries=0,
                           timeout=60) as c:
            got = c.completions.create(model="jinfer", prompt="import os\n", temperature=0.8, seed=7, max_tokens=10,
                                       n=2, extra_body={"top_k": 50, "return_token_ids": True})
            assert [_ids(x) for x in got.choices] == [x.token_ids for x in want]
            gate = StepGate(monkeypatch, srv.loop)  # the stream is held after its first chunk...
            stream = c.completions.create(model="jinfer", prompt="def g():", temperature=0, max_tokens=40,
                                          stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
            chunks = [next(iter(stream))]
            # Shutdown lets the stream in flight finish; nothing new is accepted meanwhile.
            stopper = threading.Thread(target=srv.stop, kwargs=dict(grace=60))
            stopper.start()
            assert wait_for(lambda: _refuses_connections(srv.http_port))
            gate.release()  # ...until the shutdown is under way
            chunks += list(stream)
            stopper.join()
            assert sum(len(_ids(x.choices[0])) for x in chunks) == 40
            assert chunks[-1].choices[0].finish_reason == "length"
            with pytest.raises(openai.APIConnectionError):
                c.models.list()
    finally:  # a failure above must not leave the loop held and the graceful stop waiting on it
        if gate is not None:
            gate.release()
        if stopper is not None:
            stopper.join()
        if srv.loop.is_running():
            srv.stop(grace=0)
    for bad, message in [(dict(http_port=-1), "http_port=-1 must be in [0, 65535]"),
                         (dict(port=8000, http_port=8000), "http_port=8000 is the gRPC port")]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            ServingConfig(**bad)


def test_streamed_completion_equals_the_whole_one(client):
    kwargs = dict(model="default", prompt="class Stack:", temperature=1.0, seed=3, max_tokens=8, n=2,
                  extra_body={"return_token_ids": True})
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    texts, ids, reasons = {0: "", 1: ""}, {0: [], 1: []}, {}
    for chunk in chunks[:-1]:
        assert chunk.usage is None and len(chunk.choices) == 1
        c = chunk.choices[0]
        texts[c.index] += c.text
        ids[c.index] += _ids(c)
        reasons[c.index] = c.finish_reason
    assert [texts[i] for i in (0, 1)] == [c.text for c in whole.choices]
    assert [ids[i] for i in (0, 1)] == [_ids(c) for c in whole.choices]
    assert [reasons[i] for i in (0, 1)] == [c.finish_reason for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    again = client.completions.create(**kwargs)  # same seed, same samples
    assert [c.text for c in again.choices] == [c.text for c in whole.choices]


def test_chat_renders_the_template_and_tokenizes_it_as_hf_does(client, grpc_client, tokenizer):
    ids = tokenizer.encode(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True), add_special_tokens=False)
    assert ids.count(tokenizer.bos_id) == 1 and ids[0] == tokenizer.bos_id  # the template's BOS, no second one
    want = grpc_client.generate(ids, temperature=0, max_tokens=10, logprobs=True)[0]
    got = client.chat.completions.create(model="default", messages=CHAT, temperature=0, max_completion_tokens=10,
                                         logprobs=True, extra_body={"return_token_ids": True})
    choice = got.choices[0]
    assert (choice.message.role, choice.message.content, _ids(choice)) == ("assistant", want["text"], want["token_ids"])
    assert [lp.logprob for lp in choice.logprobs.content] == pytest.approx(want["logprobs"], abs=1e-6)
    assert got.object == "chat.completion" and got.usage.prompt_tokens == len(ids)

    parts = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": "def add(a, b):"}]}]
    chunks = list(client.chat.completions.create(model="default", messages=parts, temperature=0, max_tokens=10,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in chunks) == want["text"]
    assert chunks[-1].choices[0].finish_reason == "length"

    # No max_tokens: the rest of the context.
    rest = client.chat.completions.create(model="default", messages=CHAT, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert rest.usage.completion_tokens == MAX_LEN - len(ids) and rest.choices[0].finish_reason == "length"


def test_stop_strings_and_stop_token_ids_end_the_text(client):
    full = client.completions.create(model="default", prompt="def fibonacci(n):", max_tokens=12, temperature=0,
                                     extra_body={"return_token_ids": True}).choices[0]
    stop = full.text[len(full.text) // 2:][:3]
    got = client.completions.create(model="default", prompt="def fibonacci(n):", max_tokens=12, temperature=0,
                                    stop=[stop, "@@never@@"]).choices[0]
    assert (got.text, got.finish_reason) == (full.text[:full.text.index(stop)], "stop")
    got = client.completions.create(model="default", prompt="def fibonacci(n):", max_tokens=12, temperature=0,
                                    extra_body={"stop_token_ids": [_ids(full)[3]], "return_token_ids": True}).choices[0]
    assert _ids(got) == _ids(full)[:4] and got.finish_reason == "stop"


def test_prefix_cache_hits_are_reported_as_cached_tokens(client):
    prompt = list(range(300, 340))  # 40 tokens: two full pages for the second request
    first = client.completions.create(model="default", prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model="default", prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 32 and second.usage.prompt_tokens == 40


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/completions", b"{not json", 400, "the request body is not valid JSON"),
    ("/v1/completions", b"[1]", 400, "the request body must be a JSON object"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt: Field required"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature=-1.0 must be finite and >= 0"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature: Input should be a valid number"),
    ("/v1/completions", {"prompt": "x", "n": 5}, 400, "n=5 exceeds max_n=4"),
    ("/v1/completions", {"prompt": "x", "n": 5, "stream": True}, 400, "n=5 exceeds max_n=4"),
    ("/v1/completions", {"prompt": "x", "tier": "gold"}, 400, "unknown tier='gold'; known: ['interactive', 'batch']"),
    ("/v1/completions", {"prompt": "x", "tier": "g" * 3000}, 400, "... (3002 chars); known:"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "the model 'gpt-4' does not exist"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt is a list of 2 prompts"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt is empty"),
    ("/v1/completions", {"prompt": [1, 2, 99999]}, 400, "prompt token ids [99999] are outside the vocabulary"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_LEN}, 400,
     f"max_tokens={MAX_LEN} leaves no room for a prompt within max_model_len={MAX_LEN}"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_LEN - 1}, 400, f"exceeds max_model_len={MAX_LEN}"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": MAX_LEN}, 400,
     f"max_tokens={MAX_LEN} leaves no room for a prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 3}, 400, "logprobs=3: this server returns only the sampled"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 1}, 400, "presence_penalty=1.0 is not supported"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [1, "a"]}, 400, "stop_token_ids[1]: Input should be a"),
    ("/v1/chat/completions", {"messages": []}, 400, "cannot apply the chat template to an empty conversation"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs=2: this server returns only"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0] has type='image_url': only text parts are supported"),
    ("/v1/nowhere", {}, 404, "Not Found"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(http, server, path, body, status, message):
    response = http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert message in error["message"] and len(error["message"]) < 300
    ok = http.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert _settled(server)


def test_bad_fields_are_named_in_param(http):
    response = http.post("/v1/completions", json={"prompt": "x", "top_p": 1.5})
    assert response.json()["error"]["param"] == "top_p" and "top_p=1.5 must be in (0, 1]" in response.text
    for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": CHAT})):
        response = http.post(path, json={**body, "max_tokens": 10**6})
        assert response.json()["error"]["param"] == "max_tokens", response.text
    response = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "y" * 5000}]})
    assert response.json()["error"]["param"] == "messages", response.text
    response = http.post("/v1/completions", json={"prompt": "x", "model": "nope"})
    assert response.json()["error"] | {"message": ""} == {"message": "", "type": "invalid_request_error",
                                                          "param": "model", "code": "model_not_found"}


def test_every_endpoint_but_health_needs_the_bearer_token(server):
    base = f"http://127.0.0.1:{server.http_port}"
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
        assert httpx.get(f"{base}/v1/models", headers=headers).status_code == 401
        response = httpx.post(f"{base}/v1/completions", json={"prompt": "x"}, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.completions.create(model="default", prompt="x", max_tokens=1)
    assert httpx.get(f"{base}/health").status_code == 200


def test_a_body_over_max_request_bytes_is_refused(http):
    body = {"prompt": "y" * 10000}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 413 and "max_request_bytes=8192" in response.json()["error"]["message"]
    chunked = http.post("/v1/completions", content=iter([b'{"prompt": "', b"y" * 10000, b'"}']))  # no length
    assert chunked.status_code == 413 and "max_request_bytes=8192" in chunked.json()["error"]["message"]


def test_chat_without_a_template_is_a_clear_400(http, server, monkeypatch):
    monkeypatch.setattr(server.frontend.tokenizer, "chat_template", None)
    response = http.post("/v1/chat/completions", json={"messages": CHAT})
    assert response.status_code == 400 and "this model has no chat template" in response.json()["error"]["message"]


def test_a_full_queue_is_429_and_disconnected_streams_free_their_pages(client, server, monkeypatch):
    engine, aborted, abort = server.loop.engine, [], server.loop.abort
    monkeypatch.setattr(server.loop, "abort", lambda request_id, sink: (aborted.append(request_id),
                                                                        abort(request_id, sink)))
    StepGate(monkeypatch, server.loop)  # each request is held once it has its first tokens: both stay running
    streams = [client.completions.create(model="default", prompt=f"def f{i}(x):", temperature=0, max_tokens=70, n=4,
                                         stream=True, extra_body={"ignore_eos": True}) for i in range(2)]
    ids = [next(iter(s)).id for s in streams]  # both running: 8 samples, the queue's limit
    load = engine.load()
    assert load.free_pages + load.cached_pages < load.num_pages
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model="default", prompt="x", max_tokens=2)
    assert "max_queued_requests=8" in err.value.body["message"] and err.value.body["type"] == "rate_limit_error"
    for s in streams:
        s.close()  # the client goes away mid-stream
    assert _settled(server)
    assert sorted(f"cmpl-{request_id}" for request_id in aborted) == sorted(ids)  # aborted, not run to the end


def test_a_client_gone_before_a_whole_response_aborts_its_request(server, monkeypatch):
    aborted, abort = [], server.loop.abort
    monkeypatch.setattr(server.loop, "abort", lambda request_id, sink: (aborted.append(request_id),
                                                                        abort(request_id, sink)))
    gate = StepGate(monkeypatch, server.loop)  # held once it has its first tokens: far from its 80
    body = json.dumps({"prompt": "def h():", "max_tokens": 80, "n": 4, "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {TOKEN}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=HANG_S) as conn:
        conn.sendall(head.encode() + body)
        assert gate.held.wait(HANG_S)  # generating; nothing of the response is sent before its end
    # The client closed the connection mid-generation: the request is aborted, not run to its end.
    assert _settled(server) and len(aborted) == 1


def test_health_is_503_while_the_engine_is_unhealthy(http, server, monkeypatch):
    monkeypatch.setattr(server.loop, "health", lambda: Health.STALLED)
    response = http.get("/health")
    assert response.status_code == 503 and "the engine is stalled" in response.json()["error"]["message"]
    response = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"


def test_the_http_host_serves_tls_and_names_a_taken_port(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)

    async def hello(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hello"})

    host = HttpHost(hello, "127.0.0.1", 0, ssl_certfile=str(cert), ssl_keyfile=str(key)).start()
    try:
        tls = ssl.create_default_context(cafile=str(cert))
        assert httpx.get(f"https://127.0.0.1:{host.port}/", verify=tls).text == "hello"
        with pytest.raises(RuntimeError, match=f"cannot listen for HTTP on 127.0.0.1:{host.port}"):
            HttpHost(hello, "127.0.0.1", host.port)
    finally:
        host.stop(grace=0)


def test_the_serving_benchmark_replays_over_http(server):
    target = f"http://127.0.0.1:{server.http_port}"
    info = bm.server_info(target, token=TOKEN)
    assert (info["vocab_size"], info["tiers"]) == (4096, ["interactive", "batch"])
    chat = w.poisson_arrivals(w.multi_turn(2, turns=2, system_len=20, user_len=6, output_len=5, spread=0,
                                           vocab=(8, 4096), seed=1), 50.0)
    too_long = [w.WorkItem(0.0, tuple(range(10, 120)), 4, "batch")]
    items = w.merge(chat, too_long)
    run = bm.replay(target, items, token=TOKEN, progress=False)
    by_index = {id(it): r for it, r in zip(items, run.results)}
    bad = by_index[id(too_long[0])]
    assert bad.error.startswith("HTTP 400:") and f"max_model_len={MAX_LEN}" in bad.error
    good = [r for r in run.results if r is not bad]
    assert all(r.ok and r.finish_reason == "length" and r.output_tokens == 5 and r.ttft_s > 0 for r in good)
    for s in ("s0", "s1"):  # a later turn resends the conversation, token ids included
        t0, t1 = [(it, r) for it, r in zip(items, run.results) if it.session == s]
        assert t1[1].prompt_tokens == t0[1].prompt_tokens + t0[1].output_tokens + len(t1[0].prompt)
        assert t1[1].cached_tokens >= 16
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark_serving.py"), f"--target={target}",
                           f"--token={TOKEN}", "--workload=random", "--num_requests=3", "--input_len=8",
                           "--output_len=3", "--rate=inf", "--progress=false"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "requests: 3 completed, 0 failed" in proc.stdout, proc.stderr


def test_the_speculate_extension_opts_a_request_out():
    from jinfer.serving.openai.protocol import ChatRequest, CompletionRequest, parse

    assert parse(CompletionRequest, b'{"prompt": "x"}').params().speculate
    assert not parse(CompletionRequest, b'{"prompt": "x", "speculate": false}').params().speculate
    chat = parse(ChatRequest, b'{"messages": [{"role": "user", "content": "hi"}], "speculate": false}')
    assert not chat.params(64).speculate
