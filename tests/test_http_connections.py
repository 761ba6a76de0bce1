"""The HTTP API's connections, as an outside client sees them through a real server on loopback:
TCP_NODELAY on every accepted connection, the header and keep-alive timeouts, the connection
cap, and one Authorization header per request. Every check waits for an event (a response,
the server closing the socket) under a generous deadline, never for a speed."""

import dataclasses
import http.client
import json
import socket

import pytest

from harness import benchmark as bm
from jinfer import TEST_MODEL_DIR
from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.serving.openai import HttpHost, OpenAIApi
from jinfer.serving.server import Server, ServingConfig
from jinfer.tokenizer import Tokenizer
from scheduler.simulation import workloads as w
from tests.serving_util import wait_for

TOKEN = "s3cret"
CAP = 6
CONFIG = ServingConfig(http_port=0, auth_token=TOKEN, model_name="default", http_header_timeout_s=0.5,
                       http_body_timeout_s=5.0, http_keep_alive_timeout_s=1.0, http_max_connections=CAP)
DEADLINE_S = 10.0  # for events expected within a second: generous, so a loaded machine still passes
AUTH = {"authorization": f"Bearer {TOKEN}"}
COMPLETION = json.dumps({"prompt": "def f(x):", "max_tokens": 1, "temperature": 0}).encode()


@pytest.fixture(scope="module")
def host():
    """The server's HTTP host, built from CONFIG as the server builds its own."""
    engine = Engine(load_hf_model(TEST_MODEL_DIR), Tokenizer.from_dir(TEST_MODEL_DIR),
                    CacheConfig(page_size=16, num_pages=64),
                    SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=8, max_model_len=96))
    server = Server(engine, dataclasses.replace(CONFIG, http_port=None)).start()
    host = HttpHost.from_config(OpenAIApi(server.frontend, CONFIG).app, CONFIG).start()
    status, _ = _request(_connect(host), "POST", "/v1/completions", COMPLETION)  # compiles the step program
    assert status == 200
    yield host
    host.stop(grace=1)
    server.stop(grace=1)


def _connect(host) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", host.port, timeout=DEADLINE_S)


def _request(conn, method, path, body=None, headers=AUTH) -> tuple[int, dict]:
    conn.request(method, path, body, {"content-type": "application/json", **headers})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def _raw(host) -> socket.socket:
    return socket.create_connection(("127.0.0.1", host.port), timeout=DEADLINE_S)


def _closed_by_server(sock) -> bool:
    """Reads until the server closes the socket (True); False if it is still open at the deadline."""
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    return True


def test_every_accepted_connection_has_tcp_nodelay(host):
    # Without it a response's body waits behind its head for the client's delayed ACK: +40 ms each.
    conn = _connect(host)
    assert _request(conn, "POST", "/v1/completions", COMPLETION)[0] == 200
    ours = conn.sock.getsockname()
    (theirs,) = [s for s in host.open_sockets() if s.getpeername() == ours]
    assert theirs.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    conn.close()


@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\n", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"])
def test_a_connection_without_complete_headers_is_closed_after_the_header_timeout(host, sent):
    with _raw(host) as sock:
        sock.sendall(sent)
        assert _closed_by_server(sock)


def test_a_kept_alive_connection_sending_half_a_request_is_closed_too(host):
    conn = _connect(host)
    assert _request(conn, "GET", "/health")[0] == 200
    conn.sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # then nothing: the keep-alive timer is off
    assert _closed_by_server(conn.sock)


def test_complete_headers_stop_the_header_timer(host):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(COMPLETION)}\r\n\r\n").encode()
    with _raw(host) as sock:
        sock.sendall(head)
        # A connection opened after it, with half its headers, is closed by its header timer:
        # armed later with the same timeout, so the first connection's would have fired first.
        with _raw(host) as later:
            later.sendall(b"GET /health HTTP/1.1\r\n")
            assert _closed_by_server(later)
        sock.sendall(COMPLETION)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n")


def test_a_body_that_stops_half_way_is_dropped_after_the_body_timeout(host):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(COMPLETION)}\r\n\r\n").encode()
    with _raw(host) as sock:
        sock.sendall(head + COMPLETION[:5])  # then nothing
        assert _closed_by_server(sock)
    assert wait_for(lambda: host.num_connections == 0, DEADLINE_S)


def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout(host):
    conn = _connect(host)
    assert _request(conn, "GET", "/health")[0] == 200
    assert _closed_by_server(conn.sock)


def test_connections_over_the_cap_get_503_and_are_closed_while_the_others_keep_working(host):
    assert wait_for(lambda: host.num_connections == 0, DEADLINE_S)  # the earlier tests' connections are gone
    admitted = [_connect(host) for _ in range(CAP)]
    for conn in admitted:
        assert _request(conn, "GET", "/v1/models")[0] == 200
    assert host.num_connections == CAP

    with _raw(host) as sock:
        sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        answer = b""
        while part := sock.recv(4096):  # until the server closes it
            answer += part
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "too_many_connections" and f"max_connections={CAP}" in error["message"]

    for conn in admitted:
        assert _request(conn, "POST", "/v1/completions", COMPLETION)[0] == 200
    admitted.pop().close()
    assert wait_for(lambda: host.num_connections == CAP - 1, DEADLINE_S)
    admitted.append(_connect(host))
    assert _request(admitted[-1], "GET", "/v1/models")[0] == 200
    for conn in admitted:
        conn.close()


@pytest.mark.parametrize("values", [(f"Bearer {TOKEN}", "Bearer wrong"), ("Bearer wrong", f"Bearer {TOKEN}")])
def test_two_authorization_headers_are_refused_in_either_order(host, values):
    conn = _connect(host)
    conn.putrequest("GET", "/v1/models")
    for value in values:
        conn.putheader("Authorization", value)
    conn.endheaders()
    response = conn.getresponse()
    error = json.loads(response.read())["error"]
    assert response.status == 400
    assert error["message"] == "the request has 2 Authorization headers; send exactly one"
    assert _request(conn, "GET", "/v1/models")[0] == 200  # one header, on the same connection
    conn.close()


def test_the_serving_benchmark_times_small_requests_on_one_connection(host):
    items = [w.WorkItem(0.0, tuple(range(10, 20)), 2)]
    run = bm.replay(f"http://127.0.0.1:{host.port}", items, token=TOKEN, progress=False, small_requests=5)
    assert run.results[0].ok and len(run.small_request_s) == 5
    summary = bm.summarize(run)
    assert summary["small_request_ms"]["requests"] == 5
    assert "| one connection | 5 | small_request |" in bm.format_report(summary)


@pytest.mark.parametrize("field, value, message", [
    ("http_header_timeout_s", 0.0, "http_header_timeout_s=0.0 must be a finite number of seconds > 0"),
    ("http_keep_alive_timeout_s", float("inf"), "http_keep_alive_timeout_s=inf must be a finite number"),
    ("http_max_connections", 0, "http_max_connections=0 must be >= 1"),
])
def test_bad_connection_limits_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        ServingConfig(**{field: value})
