"""Prompts too long to fit are refused from their bytes, before they are tokenized, and a
small request never waits behind a big one's tokenization: through the real server (HTTP
and gRPC), with the tokenizer watched to see what it was asked to do."""

import threading

import grpc
import httpx
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import normalizers, pre_tokenizers

from jinfer import TEST_MODEL_DIR
from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.serving import frontend as frontend_module
from jinfer.serving.client import Client
from jinfer.serving.server import Server, ServingConfig
from jinfer.tokenizer import Tokenizer, _bytes_to_unicode
from tests.serving_util import chat_model_dir, settled, wait_for

MAX_LEN = 96


class _Watched:
    """A tokenizer that records the lengths of the texts it encodes and can be held."""

    def __init__(self, tokenizer):
        self._tokenizer, self.encoded, self.hold = tokenizer, [], None

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode(self, text, **kw):
        self.encoded.append(len(text))
        if self.hold is not None and len(text) > frontend_module.BIG_PROMPT_CHARS:
            self.hold.wait(timeout=120)
        return self._tokenizer.encode(text, **kw)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = chat_model_dir(tmp_path_factory)
    engine = Engine(load_hf_model(path), Tokenizer.from_dir(path), CacheConfig(page_size=16, num_pages=32),
                    SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=MAX_LEN))
    srv = Server(engine, ServingConfig(http_port=0, max_request_bytes=8 << 20, model_name="m")).start()
    srv.frontend.tokenizer = _Watched(srv.frontend.tokenizer)
    yield srv
    srv.stop(grace=1)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}/v1", timeout=120) as c:
        yield c


BIG = "the quick brown fox " * 200_000  # 4 MB


def test_a_4mb_prompt_is_refused_from_its_bytes_without_being_tokenized(server, http):
    server.frontend.tokenizer.encoded.clear()
    r = http.post("/completions", json={"prompt": BIG, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "prompt is 4000000 bytes, so at least" in r.json()["error"]["message"]
    r = http.post("/chat/completions", json={"messages": [{"role": "user", "content": BIG}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with Client(f"127.0.0.1:{server.port}", max_message_bytes=8 << 20) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate(BIG, max_tokens=4)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes, so at least" in e.value.details()
    assert max(server.frontend.tokenizer.encoded, default=0) < 1000  # no big text was tokenized
    assert settled(server)


def test_a_prompt_just_within_the_bound_is_tokenized_and_judged_by_its_tokens(server, http):
    # Short of the byte bound: tokenized, then refused (or served) by its real token count.
    text = "ab " * ((MAX_LEN - 1) * server.frontend.tokenizer.max_bytes_per_token // 3 - 5)
    r = http.post("/completions", json={"prompt": text, "max_tokens": 1})
    assert r.status_code == 400 and "exceeds max_model_len" in r.json()["error"]["message"]
    assert len(text) in server.frontend.tokenizer.encoded


def test_a_small_request_does_not_wait_behind_a_big_ones_tokenization(server, http, monkeypatch):
    monkeypatch.setattr(frontend_module, "BIG_PROMPT_CHARS", 40)
    tokenizer = server.frontend.tokenizer
    tokenizer.hold = threading.Event()
    tokenizer.encoded.clear()
    try:
        results = {}
        bigs = [threading.Thread(target=lambda i=i: results.__setitem__(i, http.post(
            "/completions", json={"prompt": "def f(x): return x + 1 " * 3, "max_tokens": 2, "temperature": 0})))
            for i in range(3)]  # more big prompts than the small pool has threads
        for t in bigs:
            t.start()
        assert wait_for(lambda: any(n > 40 for n in tokenizer.encoded))  # a big one is in the tokenizer, held
        small = http.post("/completions", json={"prompt": "def f(x):", "max_tokens": 2, "temperature": 0})
        assert small.status_code == 200 and not results  # served while every big one is held
    finally:
        tokenizer.hold.set()
        tokenizer.hold = None
    for t in bigs:
        t.join()
    assert [results[i].status_code for i in range(3)] == [200] * 3


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_the_byte_bound_never_exceeds_the_token_count(text):
    tok = Tokenizer.from_dir(TEST_MODEL_DIR)
    assert tok.min_tokens(text) <= len(tok.encode(text, add_special_tokens=False))


def _with(normalizer=None, pre_tokenizer=None) -> Tokenizer:
    tok = Tokenizer.from_dir(TEST_MODEL_DIR).backend
    spec = tokenizers.Tokenizer.from_str(tok.to_str())
    if normalizer is not None:
        spec.normalizer = normalizer
    if pre_tokenizer is not None:
        spec.pre_tokenizer = pre_tokenizer
    return Tokenizer(spec, bos_id=None, eos_ids=())


def test_tokenizers_that_can_drop_text_take_no_byte_bound():
    plain = Tokenizer.from_dir(TEST_MODEL_DIR).max_bytes_per_token
    assert _with(normalizers.NFC()).max_bytes_per_token == 3 * plain
    assert _with(normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])).max_bytes_per_token == 12 * plain
    assert _with(normalizers.Replace("aaaa", "a")).max_bytes_per_token == 4 * plain
    for dropping in (normalizers.Strip(), normalizers.Replace(" ", ""), normalizers.Replace(tokenizers.Regex("a+"), "a")):
        assert _with(dropping).max_bytes_per_token is None
    assert _with(pre_tokenizer=pre_tokenizers.Whitespace()).max_bytes_per_token is None
    assert _with(normalizers.Strip()).min_tokens("x" * 10_000) == 0
    stripping = _with()
    stripping.backend.add_special_tokens([tokenizers.AddedToken("<mask>", lstrip=True)])
    assert Tokenizer(stripping.backend, bos_id=None, eos_ids=()).max_bytes_per_token is None
    unigram = tokenizers.Tokenizer(tokenizers.models.Unigram([("<unk>", 0.0), ("a", -1.0)], unk_id=0))
    assert Tokenizer(unigram, bos_id=None, eos_ids=()).max_bytes_per_token is None


@pytest.mark.parametrize("normalizer, text", [
    (normalizers.NFKC(), "\U0001D400" * 300), (normalizers.NFD(), "\u212A" * 300),
    (normalizers.NFC(), "\u1100\u1161\u11A8" * 200), (normalizers.Lowercase(), "\u212A" * 300),
    (normalizers.Replace("aaaa", "a"), "a" * 4000)])
def test_normalizers_that_shrink_text_are_bounded_by_their_factor(normalizer, text):
    # One token per byte (at most 2 UTF-8 bytes in the vocabulary), so a factor too small
    # for the normalizer puts the bound above the real count.
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={c: b for b, c in _bytes_to_unicode().items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.normalizer = normalizer
    tok = Tokenizer(tok, bos_id=None, eos_ids=())
    assert tok.max_bytes_per_token is not None
    assert tok.min_tokens(text) <= len(tok.encode(text, add_special_tokens=False))
