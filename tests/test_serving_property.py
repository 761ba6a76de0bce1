"""Random request bodies, in and out of range, through the real HTTP and gRPC servers while
victim streams run: every request gets a 2xx or a 4xx that names its bad field (never a 5xx),
and every victim gets exactly the tokens it gets alone."""

import json
import math
import re
import threading

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.serving.client import Client
from jinfer.serving.server import Server, ServingConfig
from jinfer.tokenizer import Tokenizer
from tests.serving_util import chat_model_dir, settled

MAX_LEN = 96
VICTIM = dict(temperature=0, max_tokens=48, ignore_eos=True)
BOUNDS = [0, 1, -1, 2, 3, 95, 96, 97, 2**31 - 1, 2**31, -(2**31), 2**32, 2**53, 2**63 - 1, 2**63, -(2**63), 10**30]
FLOATS = [0.0, 1e-45, 1e-39, 1e-300, 0.5, 1.0, 1.5, 2.0, 1e30, 3.4e38, 3.5e38, 1e300, -0.0, -1.0]
# Out-of-range numbers as JSON spells them (Python's json writes inf/nan as bare words).
RAW_NUMBERS = ["1e400", "-1e400", "NaN", "Infinity", "1" + "0" * 400, "0.1e-400"]


class _Raw(str):
    """A number spliced into the JSON body as written."""


def _values(field: str):
    """Values for one field: mostly numbers at and past the bounds the server and the step
    hold, some of other JSON types."""
    numbers = st.one_of(st.sampled_from(BOUNDS), st.integers(), st.sampled_from(FLOATS), st.floats(allow_nan=False),
                        st.sampled_from(RAW_NUMBERS).map(_Raw))
    others = st.one_of(st.text(max_size=8), st.booleans(), st.none(), st.lists(st.integers(-5, 5000), max_size=4),
                       st.lists(st.text(max_size=4), max_size=3))
    return st.one_of(numbers, numbers, numbers, others)


def _valid_base():
    """A body that asks for a few tokens, valid in every field: each example breaks 1-2 of them."""
    return st.fixed_dictionaries({"max_tokens": st.integers(1, 6)}, optional={
        "temperature": st.sampled_from([0, 0.7, 1.0]), "top_p": st.sampled_from([0.5, 1.0]),
        "top_k": st.sampled_from([0, 5]), "seed": st.integers(0, 99), "n": st.integers(1, 2)})


FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "seed", "stop", "stop_token_ids",
          "logprobs", "ignore_eos", "tier", "echo", "best_of", "frequency_penalty", "speculate", "max_completion_tokens",
          "top_logprobs", "presence_penalty", "stream"]


def _body_json(body: dict) -> bytes:
    """json.dumps, with _Raw values written as they are."""
    raws = {}
    for i, (key, value) in enumerate(list(body.items())):
        if isinstance(value, _Raw):
            raws[f"__raw{i}__"] = str(value)
            body[key] = f"__raw{i}__"
    text = json.dumps(body)
    for marker, raw in raws.items():
        text = text.replace(f'"{marker}"', raw)
    return text.encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = chat_model_dir(tmp_path_factory)
    engine = Engine(load_hf_model(path), Tokenizer.from_dir(path), CacheConfig(page_size=16, num_pages=64),
                    SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=8, max_model_len=MAX_LEN))
    srv = Server(engine, ServingConfig(http_port=0, tiers=("interactive", "batch"), max_queued_requests=16, max_n=4,
                                       max_request_bytes=1 << 16, model_name="m")).start()
    yield srv
    srv.stop(grace=1)


class _Victims:
    """Greedy requests one after another on their own thread, each checked against the
    tokens the same request gets alone, until stopped."""

    def __init__(self, port: int):
        self.client = Client(f"127.0.0.1:{port}")
        self.alone = self.client.generate("def f(x):", **VICTIM)[0]["token_ids"]
        self.runs, self.wrong, self.errors = 0, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                tokens = self.client.generate("def f(x):", timeout=120, **VICTIM)[0]["token_ids"]
            except grpc.RpcError as e:  # noqa: PERF203 - any failure of a victim is the finding
                self.errors.append((e.code(), e.details()))
                continue
            self.runs += 1
            if tokens != self.alone:
                self.wrong.append(tokens)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=300)
        self.client.close()


def _check_http(http: httpx.Client, path: str, body: dict) -> None:
    sent = dict(body)
    r = http.post(path, content=_body_json(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, (sent, r.status_code, r.text)
    if r.status_code == 200 and sent.get("stream") is True:
        assert '"error"' not in r.text, (sent, r.text)
    if r.status_code == 400:
        error = r.json()["error"]
        named = error["param"]
        assert named is not None and (named in sent or named in ("prompt", "messages")), (sent, error)


@st.composite
def _http_fields(draw):
    fields = draw(_valid_base())
    for name in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=2, unique=True)):
        fields[name] = draw(_values(name))
    return fields


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(fields=_http_fields(), chat=st.booleans(),
       prompt=st.one_of(st.text(min_size=1, max_size=40), st.lists(st.integers(0, 4095), min_size=1, max_size=6),
                        st.text(max_size=40), st.lists(st.integers(-3, 5000), max_size=6)))
def _http_examples(http, fields, chat, prompt):
    if chat:
        content = prompt if isinstance(prompt, str) else "hi"
        _check_http(http, "/chat/completions", {"messages": [{"role": "user", "content": content}], **fields})
    else:
        _check_http(http, "/completions", {"prompt": prompt, **fields})


def _grpc_fields():
    i32 = st.one_of(st.sampled_from([0, 1, -1, 95, 96, 97, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1))
    f32 = st.one_of(st.sampled_from([0.0, 1e-45, 0.5, 1.0, 3.4e38, math.inf, -math.inf, math.nan, -1.0]),
                    st.floats(width=32))
    return st.fixed_dictionaries({}, optional={
        "temperature": f32, "top_p": f32, "min_p": f32, "top_k": i32, "max_tokens": i32, "n": i32,
        "seed": st.one_of(st.sampled_from([-1, 0, 2**31 - 1, 2**31, 2**63 - 1, -(2**63)]), st.integers(-(2**63), 2**63 - 1)),
        "stop": st.lists(st.text(max_size=4), max_size=3), "stop_token_ids": st.lists(i32, max_size=3),
        "ignore_eos": st.booleans(), "logprobs": st.booleans(), "tier": st.sampled_from(["", "batch", "nope", "\x00"]),
        "speculate": st.booleans()})


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(fields=_grpc_fields(),
       prompt=st.one_of(st.text(max_size=40), st.lists(st.integers(-(2**31), 2**31 - 1), max_size=6),
                        st.lists(st.integers(0, 5000), min_size=1, max_size=6)))
def _grpc_examples(client, fields, prompt):
    try:
        for _ in client.generate_stream(prompt, timeout=120, **fields):
            pass
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (
            fields, prompt, e.code(), e.details())
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:  # it opens with the field it is about
            named = re.match(r"(?:unknown )?([a-z_]+)", e.details())
            assert named and named.group(1) in {*fields, "prompt"}, (fields, prompt, e.details())


def test_random_http_and_grpc_requests_never_fail_the_server_or_its_other_streams(server):
    with _Victims(server.port) as victims:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}/v1", timeout=120) as http:
            _http_examples(http)
        with Client(f"127.0.0.1:{server.port}") as client:
            _grpc_examples(client)
    assert victims.runs >= 1 and victims.errors == [] and victims.wrong == []
    assert settled(server)
