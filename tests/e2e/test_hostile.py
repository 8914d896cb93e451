"""Hostile HTTP: every probe gets a documented answer or a closed connection, never a
panic, a hang of other requests or a gateway that stops serving.

Each probe runs against a gateway of its own (a crash must not take the rest of the
suite with it) and ends by checking that the process is alive and a normal request is
still answered promptly.
"""

from __future__ import annotations

import http.client
import json
import resource
import socket
import threading
import time

import httpx
import pytest

from helpers import ACME, audit_rows, chat_body, post_chat

# A distinct override gives this module its own gateway process.
OWN = {"node": {"region": "hostile-probes"}}
PROBE_DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def gw(gateway):
    return gateway(OWN)


def addr(gw) -> tuple[str, int]:
    host, port = gw.base_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def exchange(gw, raw: bytes, deadline: float = PROBE_DEADLINE_S) -> bytes:
    """Sends `raw` and reads until the server closes or stops talking for a moment
    after answering; returns what came back (b"" for a plain close)."""
    s = socket.create_connection(addr(gw), timeout=deadline)
    try:
        s.sendall(raw)
        out = b""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            try:
                s.settimeout(0.5 if out else max(0.1, end - time.monotonic()))
                chunk = s.recv(65536)
            except socket.timeout:
                if out:
                    break
                continue
            except (ConnectionResetError, BrokenPipeError):
                break
            if not chunk:
                break
            out += chunk
        else:
            pytest.fail(f"no answer and no close within {deadline}s")
        return out
    finally:
        s.close()


def status_of(resp: bytes) -> int | None:
    if not resp.startswith(b"HTTP/"):
        return None
    return int(resp.split(b" ", 2)[1])


def body_of(resp: bytes) -> bytes:
    return resp.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in resp else b""


def assert_still_serving(gw) -> None:
    assert gw.proc.poll() is None, f"gateway died:\n{gw.log_text()}"
    t0 = time.monotonic()
    r = post_chat(gw, chat_body("still there?"))
    assert r.status_code == 200, r.text
    assert time.monotonic() - t0 < 5.0


def request(body: bytes, extra_headers: str = "", key: str = ACME) -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra_headers}"
        "Connection: close\r\n\r\n"
    ).encode() + body


def assert_openai_error(resp: bytes, status: int, code: str) -> None:
    assert status_of(resp) == status, resp[:300]
    err = json.loads(body_of(resp))["error"]
    assert err["code"] == code, err
    assert err["message"]


def test_invalid_utf8_body_is_a_400(gw):
    resp = exchange(gw, request(b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"\xff\xfe"}]}'))
    assert_openai_error(resp, 400, "invalid_request")
    assert_still_serving(gw)


def test_deeply_nested_json_is_a_400(gw):
    depth = 200_000
    body = b'{"model":"gpt-4o-mini","messages":' + b"[" * depth + b"]" * depth + b"}"
    resp = exchange(gw, request(body))
    assert_openai_error(resp, 400, "invalid_request")
    assert_still_serving(gw)


def test_body_that_is_not_an_object_is_a_400(gw):
    for body in (b"", b"null", b"[]", b'"x"', b"{", b'{"messages":"no"}'):
        resp = exchange(gw, request(body))
        assert_openai_error(resp, 400, "invalid_request")
    assert_still_serving(gw)


def test_oversized_header_is_refused(gw):
    big = "x" * (1 << 20)
    resp = exchange(gw, request(b"{}", extra_headers=f"X-Big: {big}\r\n"))
    # Pingora refuses a header block above its limit: an error status or a close.
    assert status_of(resp) in (None, 400, 413, 431), resp[:200]
    assert_still_serving(gw)


def test_thousands_of_headers_are_refused_or_ignored(gw):
    many = "".join(f"X-H{i}: v\r\n" for i in range(20_000))
    resp = exchange(gw, request(json.dumps(chat_body("hi")).encode(), extra_headers=many))
    assert status_of(resp) in (None, 200, 400, 431), resp[:200]
    assert_still_serving(gw)


def test_conflicting_content_lengths_are_refused(gw):
    body = json.dumps(chat_body("hi")).encode()
    raw = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ACME}\r\n"
        f"Content-Length: {len(body)}\r\nContent-Length: {len(body) + 5}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    resp = exchange(gw, raw)
    assert status_of(resp) in (None, 400), resp[:200]
    assert_still_serving(gw)


def test_content_length_with_chunked_does_not_smuggle_a_request(gw):
    """CL and TE together: the smuggled second request (an unknown key) must never be
    processed as a request of its own."""
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-smuggled\r\n\r\n"
    inner = json.dumps(chat_body("hi")).encode()
    chunked = f"{len(inner):x}\r\n".encode() + inner + b"\r\n0\r\n\r\n"
    raw = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ACME}\r\n"
        f"Content-Length: {len(chunked)}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode() + chunked + smuggled
    resp = exchange(gw, raw)
    # At most one answer, and it is not the smuggled 401.
    assert resp.count(b"HTTP/1.1 ") <= 1, resp[:400]
    assert b"invalid_api_key" not in resp
    assert status_of(resp) in (None, 200, 400), resp[:200]
    assert_still_serving(gw)


def test_garbage_request_line_is_refused(gw):
    for raw in (b"GARBAGE\r\n\r\n", b"\x00\x01\x02\r\n\r\n", b"POST / HTTP/9.9\r\n\r\n"):
        resp = exchange(gw, raw)
        assert status_of(resp) in (None, 400, 404, 405, 505), resp[:200]
    assert_still_serving(gw)


def test_invalid_bytes_in_authorization_are_a_401(gw):
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer \xff\xfe\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    resp = exchange(gw, raw)
    assert_openai_error(resp, 401, "invalid_api_key")
    assert_still_serving(gw)


def test_slow_body_sender_does_not_hold_up_others(gw):
    """A sender that trickles its body: other tenants are served meanwhile, and the
    trickler is eventually cut off or answered, never served a hang."""
    body = json.dumps(chat_body("slow")).encode()
    s = socket.create_connection(addr(gw), timeout=10)
    stop = threading.Event()
    try:
        s.sendall(request(body)[: -len(body)])

        def trickle() -> None:
            for b in body[:20]:
                if stop.is_set():
                    return
                try:
                    s.sendall(bytes([b]))
                except OSError:
                    return
                time.sleep(0.2)

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        for _ in range(5):
            assert_still_serving(gw)
    finally:
        stop.set()
        s.close()


# Short client deadlines for the slow-sender probes (defaults: 60 s each).
DEADLINES = {"LLM_GATEWAY_CLIENT_HEADER_TIMEOUT_MS": "1500", "LLM_GATEWAY_CLIENT_BODY_TIMEOUT_MS": "1500"}


def trickle_until_closed(s: socket.socket, data: bytes, every_s: float, limit_s: float) -> tuple[bytes, float]:
    """Sends `data` a byte every `every_s` (far inside Pingora's 60 s per-read timeout)
    until the server answers or closes; returns (what came back, seconds it took)."""
    t0 = time.monotonic()
    out = b""
    s.settimeout(every_s)
    for b in data:
        if time.monotonic() - t0 > limit_s:
            pytest.fail(f"still trickling after {limit_s}s: no deadline cut the sender off")
        try:
            s.sendall(bytes([b]))
        except OSError:
            break
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    else:
        pytest.fail("the whole slow request went through: no deadline cut the sender off")
    s.settimeout(2)
    try:
        while chunk := s.recv(65536):
            out += chunk
    except OSError:
        pass
    return out, time.monotonic() - t0


def test_slowloris_head_is_cut_off_at_the_head_deadline(gateway):
    """Headers trickled a byte every 0.1 s: each read is prompt, so only a deadline on the
    whole head (LLM_GATEWAY_CLIENT_HEADER_TIMEOUT_MS) ends it; the connection closes."""
    gw = gateway(OWN, env=DEADLINES)
    head = request(b"{}").split(b"\r\n\r\n")[0] + b"\r\nX-Pad: " + b"a" * 400
    s = socket.create_connection(addr(gw), timeout=10)
    try:
        out, took = trickle_until_closed(s, head, 0.1, limit_s=15)
    finally:
        s.close()
    assert out == b"", out[:200]
    assert 1.0 <= took < 10, took
    assert_still_serving(gw)


def test_slow_body_is_a_408_at_the_body_deadline(gateway):
    """A body trickled a byte every 0.1 s is answered 408 `request_timeout` once the body
    deadline passes, the connection closes, and the request has its audit row."""
    gw = gateway(OWN, env=DEADLINES)
    rid = f"slow-body-{time.monotonic_ns()}"
    body = json.dumps(chat_body("slow " * 100)).encode()
    s = socket.create_connection(addr(gw), timeout=10)
    try:
        s.sendall(request(body, extra_headers=f"x-request-id: {rid}\r\n")[: -len(body)])
        out, took = trickle_until_closed(s, body, 0.1, limit_s=15)
    finally:
        s.close()
    assert_openai_error(out, 408, "request_timeout")
    assert 1.0 <= took < 10, took
    row = audit_rows(gw, rid)[0]
    assert (row["status"], row["error_code"]) == (408, "request_timeout"), row
    assert_still_serving(gw)


def test_head_deadline_spares_slow_answers_and_kept_alive_clients(gateway):
    """The head deadline is on the head only: an answer slower than it, and a kept-alive
    connection whose next request comes within it, are served."""
    gw = gateway(OWN, env=DEADLINES)
    host, port = addr(gw)
    conn = http.client.HTTPConnection(host, port, timeout=15)
    headers = {"authorization": f"Bearer {ACME}", "content-type": "application/json"}
    try:
        t0 = time.monotonic()
        conn.request("POST", "/v1/chat/completions", headers=headers,
                     body=json.dumps(chat_body("[[mock: ttft_ms=2500]] slow answer")))
        r = conn.getresponse()
        assert r.status == 200, r.read()
        r.read()
        assert time.monotonic() - t0 >= 2.5
        sock = conn.sock
        time.sleep(0.5)  # idle, inside the head deadline, on the same connection
        conn.request("POST", "/v1/chat/completions", headers=headers, body=json.dumps(chat_body("next")))
        r = conn.getresponse()
        assert r.status == 200, r.read()
        r.read()
        assert conn.sock is sock, "the kept-alive connection was not reused"
    finally:
        conn.close()


def test_client_that_never_reads_its_stream_does_not_stall_others(gw):
    """Streams into a client that stops reading fill the socket buffers; the gateway
    must keep serving everyone else."""
    body = json.dumps(chat_body("[[mock: tokens=20000; gap_ms=0]] long", stream=True)).encode()
    stuck = []
    try:
        for _ in range(4):
            s = socket.create_connection(addr(gw), timeout=10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(request(body))
            stuck.append(s)
        for _ in range(5):
            assert_still_serving(gw)
    finally:
        for s in stuck:
            s.close()
    assert_still_serving(gw)


def test_thousands_of_idle_connections(gw):
    """Idle connections cost a socket each, not a worker: with 10,000 open, a normal
    request is still answered promptly."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 10_000
    if soft < want + 200:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, want + 1000), hard))
        except (ValueError, OSError):
            pass
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = min(want, soft - 200)
    if n < 500:
        pytest.skip(f"file descriptor limit {soft} too low for this probe")
    socks = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection(addr(gw), timeout=5))
        assert_still_serving(gw)
    finally:
        for s in socks:
            s.close()
    assert_still_serving(gw)


def test_client_that_never_reads_is_cut_off_and_its_upstream_cancelled(gateway):
    """A blocked write to the client times out (LLM_GATEWAY_CLIENT_WRITE_TIMEOUT_MS):
    the request ends as `client_closed` instead of holding its upstream call forever."""
    # No output bound on the model: a max_tokens above one would be refused (400), and
    # the answer must be far longer than what the socket buffers hold.
    unbounded = {**OWN, "models": {"gpt-4o-mini": {"max_output_tokens": None}}}
    gw = gateway(unbounded, env={"LLM_GATEWAY_CLIENT_WRITE_TIMEOUT_MS": "1500"})
    rid = f"never-reads-{time.monotonic_ns()}"
    body = json.dumps(chat_body("[[mock: tokens=100000; gap_ms=0]] a very long answer", stream=True,
                                max_tokens=100000)).encode()
    s = socket.create_connection(addr(gw), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        s.sendall(request(body, extra_headers=f"x-request-id: {rid}\r\n"))
        # Never read. The row appears once the gateway gives up on this client.
        row = audit_rows(gw, rid, timeout=20)[0]
    finally:
        s.close()
    assert row["error_code"] == "client_closed", json.dumps(row)
    assert row["latency_ms"] >= 1500, row
    # The generated part is billed, never zero.
    assert row["tokens_out"] > 0 and row["cost_nanousd"] > 0, row
    assert_still_serving(gw)


def test_data_plane_exposes_no_admin_path_to_a_tenant(gw):
    """A tenant key on the client listener reaches no usage, audit, purge, reload or
    metrics path: those live only on the admin listener, behind the admin token."""
    headers = {"authorization": f"Bearer {ACME}"}
    paths = [("GET", "/admin/v1/tenants/globex/usage"), ("GET", "/admin/v1/tenants/globex/audit"),
             ("POST", "/admin/v1/tenants/globex/cache/purge"), ("POST", "/admin/v1/reload"),
             ("GET", "/admin/v1/providers"), ("GET", "/metrics"), ("GET", "/v1/../admin/v1/providers")]
    with httpx.Client(timeout=10) as c:
        for method, path in paths:
            r = c.request(method, gw.base_url + path, headers=headers)
            assert r.status_code in (404, 405), (method, path, r.status_code, r.text[:200])
            assert "globex" not in r.text and "llmgw_" not in r.text, (path, r.text[:200])
    assert_still_serving(gw)
