"""Routing policy and failover (issue 4), through the binary and the mock provider.

Fallback chains and the `x-gateway-fallback` override, region pins, failover on every
trigger before the first byte (refused connection, reset, 5xx, 429, first-token and
total timeouts, unreadable 200), client 4xx passed on without failover, fast 503/504
when the whole chain is down, the per-provider circuit breaker (shared by tenants,
skipped without a connection, one probe, closes again), the retry budget, and honest
mid-stream failures.

Every test gets its own gateway process: circuit breakers and the retry budget are
per process, and a test that trips them must not change what the next one sees.

How a fault is made to hit one candidate only: a provider on a closed port (refused),
a provider on a second mock whose first token is 5 s late (timeouts), a tiny local stub
that answers garbage, resets or stalls (the mock's own `fault=` directives would hit every
attempt alike), or `fail_first=1;key=<unique>` (the first request carrying that key
gets the error, the next attempt succeeds). Providers on the session mock are told
apart by their base URL's path prefix (`/inhouse`, `/flaky`, `/eu1`, ...) in its log.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid

import httpx
import pytest
from anthropic import Anthropic

from conftest import ADMIN_TOKEN, sha256_hex
from helpers import (assert_anthropic_error, assert_openai_error, audit_rows, chat_body, chunks_of,
                     content_of_chunks, messages_body, new_request_id, post_chat, post_messages, stream_chat,
                     stream_messages, text_of_anthropic_events)

PRICE = {"input_per_mtok": 0.10, "output_per_mtok": 0.10}
US, EU = "us-east-1", "eu-west-1"

# Upstream paths on the session mock, per provider of the config below.
OPENAI_PATH = "/v1/chat/completions"          # provider openai (gpt-4o-mini)
INHOUSE_PATH = "/inhouse/v1/chat/completions"  # provider inhouse (llama-70b)
ANTHROPIC_PATH = "/v1/messages"                # provider anthropic (claude-haiku)

# The second mock: every reply's first token comes after 5 s.
SLOW_TTFT_MS = 5000
# ... and the provider on it gives up long before that.
SLOW_FIRST_TOKEN_MS = 300
SLOW_TOTAL_MS = 600

# The stub's stalls last this long, far beyond the stalled provider's first_token_ms.
STALL_S = 60
STALLED_FIRST_TOKEN_MS = 800

# "Well under a second" for answers that need no upstream wait.
FAST_S = 1.0

# Circuit breaker constants of the contract (issue 4, /admin/v1/providers).
TRIP_FAILURES = 5
OPEN_S = 5.0

# Tenants of this module (key per tenant).
FO = "sk-failover-test"           # chains with fallback [llama-70b], overrides allowed
STRICT = "sk-strict-test"         # fallback [llama-70b], overrides NOT allowed
EURO = "sk-euro-test"             # region pin eu-west-1
APAC = "sk-apac-test"             # region pin with no model in that region
FLAKY_ONLY = "sk-flaky-only-test"  # only flaky-model
FLAKY_FB = "sk-flaky-fb-test"     # flaky-model, then llama-70b
PAIR = "sk-pair-test"             # pa-model, then pb-model (double outage)
BUDGET = "sk-budget-test"         # five dead models, then llama-70b
DEAD_FOR_BUDGET = [f"dead{i}-model" for i in range(1, 6)]


# --------------------------------------------------------------------------- a stub provider


class _StubHandler(http.server.BaseHTTPRequestHandler):
    """`/garbage/...`: 200 with a body that is not JSON. `/reset/...`: reads the request
    and resets the connection without a response. `/stall/...`: sends a stream's
    response header, then nothing for a minute; `/stall-head/...`: not even the header."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        if self.path.startswith("/stall-head/"):
            time.sleep(STALL_S)
            self.close_connection = True
            return
        if self.path.startswith("/stall/"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            self.wfile.flush()
            time.sleep(STALL_S)
            self.close_connection = True
            return
        if self.path.startswith("/reset/"):
            # linger 0: close() sends RST instead of FIN
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        body = b"<html><body>upstream says hi</body></html> definitely not json"
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _StubServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # quiet on resets
        pass


@pytest.fixture(scope="module")
def stub():
    srv = _StubServer(("127.0.0.1", 0), _StubHandler)
    srv.hits = []  # type: ignore[attr-defined]
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, name="failover-stub", daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def slow_mock(extra_mock):
    return extra_mock("slow", "--ttft-ms", str(SLOW_TTFT_MS))


# --------------------------------------------------------------------------- config


def _provider(base_url: str, region: str = US, timeouts: dict | None = None) -> dict:
    return {
        "kind": "openai_compatible",
        "base_url": base_url,
        "region": region,
        "timeouts": timeouts or {"connect_ms": 1000, "first_token_ms": 5000, "idle_ms": 5000, "total_ms": 10000},
    }


def _tenant(key: str, models: list[str], **extra) -> dict:
    return {"api_keys": [{"id": f"{key}-id", "sha256": sha256_hex(key)}], "models": models, **extra}


def routing_overrides(mock_url: str, closed_port: int, slow_url: str, stub_url: str) -> dict:
    dead = f"http://127.0.0.1:{closed_port}"
    providers = {
        "dead": _provider(dead),
        "dead2": _provider(f"{dead}/two"),
        **{f"dead{i}": _provider(f"{dead}/d{i}") for i in range(1, 6)},
        "slow": _provider(f"{slow_url}/slow", timeouts={"connect_ms": 1000, "first_token_ms": SLOW_FIRST_TOKEN_MS,
                                                        "idle_ms": 1000, "total_ms": SLOW_TOTAL_MS}),
        # The same slow mock, opted out of upstream streaming: its non-streamed answers
        # arrive in one piece, so only total_ms bounds them (the old behaviour).
        "slowoc": {**_provider(f"{slow_url}/slowoc", timeouts={
            "connect_ms": 1000, "first_token_ms": SLOW_FIRST_TOKEN_MS, "idle_ms": 1000,
            "total_ms": SLOW_TOTAL_MS}), "upstream_streaming": "as_client"},
        # Stalls for a minute; total_ms would let it hold a non-streaming request that long.
        **{p: _provider(f"{stub_url}/{p}", timeouts={
            "connect_ms": 1000, "first_token_ms": STALLED_FIRST_TOKEN_MS, "idle_ms": 120000,
            "total_ms": 120000}) for p in ("stall", "stall-head")},
        "garbage": _provider(f"{stub_url}/garbage"),
        "reset": _provider(f"{stub_url}/reset"),
        "flaky": _provider(f"{mock_url}/flaky"),
        "pa": _provider(f"{mock_url}/pa"),
        "pb": _provider(f"{mock_url}/pb"),
        "eu1": _provider(f"{mock_url}/eu1", region=EU),
        "eu2": _provider(f"{mock_url}/eu2", region=EU),
    }
    models = {f"{p}-model": {"provider": p, "price": PRICE} for p in providers if p not in ("eu1", "eu2")}
    models["eu-a"] = {"provider": "eu1", "price": PRICE}
    models["eu-b"] = {"provider": "eu2", "price": PRICE}
    std = ["gpt-4o-mini", "llama-70b", "claude-haiku"]
    tenants = {
        "fo": _tenant(FO, std + ["dead-model", "dead2-model", "slow-model", "slowoc-model", "stall-model",
                                 "stall-head-model", "garbage-model", "reset-model"],
                      fallback=["llama-70b"], allow_fallback_override=True),
        "strict": _tenant(STRICT, std, fallback=["llama-70b"]),
        "euro": _tenant(EURO, ["eu-a", "gpt-4o-mini", "llama-70b", "eu-b"],
                        fallback=["gpt-4o-mini", "llama-70b", "eu-b"], region=EU),
        "apac": _tenant(APAC, ["gpt-4o-mini", "eu-a"], region="ap-south-1"),
        "flaky-only": _tenant(FLAKY_ONLY, ["flaky-model"]),
        "flaky-fb": _tenant(FLAKY_FB, ["flaky-model", "llama-70b"], fallback=["llama-70b"]),
        "pair": _tenant(PAIR, ["pa-model", "pb-model"], fallback=["pb-model"]),
        "budget": _tenant(BUDGET, DEAD_FOR_BUDGET + ["llama-70b"], fallback=["llama-70b"]),
    }
    return {"providers": providers, "models": models, "tenants": tenants}


@pytest.fixture
def gw(gateway, request, mock, closed_port, slow_mock, stub):
    """A gateway of its own for this test (fresh breakers and retry budget), stopped after it."""
    overrides = routing_overrides(mock.url, closed_port, slow_mock.url, stub.url)
    # A tenant named after the test makes the config (and so the process) this test's own.
    tag = "iso-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]
    overrides["tenants"][tag] = _tenant(f"sk-{tag}", ["llama-70b"])
    g = gateway(overrides)
    yield g
    if g.proc.poll() is None:
        g.proc.send_signal(signal.SIGINT)  # Pingora's fast shutdown (SIGTERM waits out a grace period)
        try:
            g.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            g.proc.kill()
            g.proc.wait(timeout=5)


# --------------------------------------------------------------------------- helpers


def upstream_paths(mock) -> list[str]:
    return [str(q.get("path")) for q in mock.requests()]


def count(mock, path: str) -> int:
    return sum(1 for p in upstream_paths(mock) if p == path)


def providers(gw, token: str | None = ADMIN_TOKEN) -> dict[str, dict]:
    h = {"authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(f"{gw.admin_url}/admin/v1/providers", headers=h, timeout=5)
    assert r.status_code == 200, f"/admin/v1/providers -> {r.status_code}: {r.text[:300]}"
    return {p["name"]: p for p in r.json()["providers"]}


def timed(fn, *a, **kw):
    t0 = time.monotonic()
    r = fn(*a, **kw)
    return r, time.monotonic() - t0


def rid_headers(extra: dict | None = None) -> tuple[str, dict]:
    rid = new_request_id("fo")
    return rid, {"x-request-id": rid, **(extra or {})}


def one_audit_row(gw, rid: str) -> dict:
    rows = audit_rows(gw, rid)
    assert len(rows) == 1, f"expected one audit row for {rid}, got {rows}"
    return rows[0]


def assert_served_by_fallback(r: httpx.Response, model: str = "llama-70b", provider: str = "inhouse",
                              attempts: int = 2) -> None:
    h = r.headers
    got = {k: h.get(k) for k in ("x-gateway-model", "x-gateway-provider", "x-gateway-attempts", "x-gateway-fallback")}
    assert got == {"x-gateway-model": model, "x-gateway-provider": provider,
                   "x-gateway-attempts": str(attempts), "x-gateway-fallback": "true"}, got
    assert h.get("x-request-id"), "x-request-id on every response"


def assert_audit(gw, rid: str, **expected) -> dict:
    row = one_audit_row(gw, rid)
    got = {k: row.get(k) for k in expected}
    assert got == expected, f"audit row {rid}: {got} != {expected}\nrow: {row}"
    return row


def json_body(r: httpx.Response):
    try:
        return r.json()
    except ValueError:
        raise AssertionError(f"the {r.status_code} body is not JSON (content-length {r.headers.get('content-length')}, "
                             f"{len(r.content)} bytes read): {r.text[:300]!r}") from None


def unique_key() -> str:
    return uuid.uuid4().hex


def fail_first_once(status: int | None = None) -> dict:
    """`x-mock` making only the first upstream request of this client request fail
    (the header is forwarded to every attempt; the key counts them)."""
    v = f"fail_first=1;key={unique_key()}"
    if status:
        v += f";status={status}"
    return {"x-mock": v}


# --------------------------------------------------------------------------- 1. failover triggers

# (trigger, first model of the chain, x-mock headers factory, stream); the fallback is llama-70b
TRIGGERS = [
    ("refused", "dead-model", lambda: {}, False),
    ("refused", "dead-model", lambda: {}, True),
    ("reset", "reset-model", lambda: {}, False),
    ("reset", "reset-model", lambda: {}, True),
    ("503", "gpt-4o-mini", lambda: fail_first_once(), False),
    ("503", "gpt-4o-mini", lambda: fail_first_once(), True),
    ("429", "gpt-4o-mini", lambda: fail_first_once(429), False),
    ("429", "gpt-4o-mini", lambda: fail_first_once(429), True),
    ("500", "claude-haiku", lambda: fail_first_once(500), True),
    ("first_token_timeout", "slow-model", lambda: {}, True),
    # a non-streaming request is a stream upstream: first_token_ms bounds it too
    ("first_token_timeout", "slow-model", lambda: {}, False),
    # ... unless its provider opted out (upstream_streaming: as_client)
    ("total_timeout", "slowoc-model", lambda: {}, False),
    ("garbage", "garbage-model", lambda: {}, False),
]


@pytest.mark.parametrize("trigger,first,extra,stream", TRIGGERS,
                         ids=[f"{t[0]}-{'stream' if t[3] else 'nonstream'}" for t in TRIGGERS])
def test_failover_trigger_serves_second_model(gw, mock, stub, slow_mock, trigger, first, extra, stream):
    slow_mock.reset()
    stub_hits = len(stub.hits)
    rid, h = rid_headers(extra())
    body = chat_body(f"Failover on {trigger}. [[mock: tokens=5]]", model=first, stream=stream)
    t0 = time.monotonic()
    if stream:
        r, events, _ = stream_chat(gw, body, key=FO, headers=h)
        elapsed = time.monotonic() - t0
        assert r.status_code == 200, r.text
        assert content_of_chunks(chunks_of(events)).strip(), "the fallback's tokens reached the client"
    else:
        r = post_chat(gw, body, key=FO, headers=h)
        elapsed = time.monotonic() - t0
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].strip()
    assert_served_by_fallback(r)
    assert r.headers["x-request-id"] == rid

    # the first candidate was really tried once, the fallback once
    assert count(mock, INHOUSE_PATH) == 1, upstream_paths(mock)
    if first == "gpt-4o-mini":
        assert count(mock, OPENAI_PATH) == 1, upstream_paths(mock)
    elif first == "claude-haiku":
        assert count(mock, ANTHROPIC_PATH) == 1, upstream_paths(mock)
    elif first in ("garbage-model", "reset-model"):
        assert len(stub.hits) - stub_hits == 1, stub.hits[stub_hits:]
    elif first in ("slow-model", "slowoc-model"):
        assert len(slow_mock.requests()) == 1
        assert slow_mock.requests()[0]["stream"] is (stream or first == "slow-model")

    if trigger == "first_token_timeout":
        assert SLOW_FIRST_TOKEN_MS / 1000 - 0.05 <= elapsed < 2.0, f"first_token_ms is 300 ms: {elapsed:.2f}s"
    elif trigger == "total_timeout":
        assert SLOW_TOTAL_MS / 1000 - 0.05 <= elapsed < 2.0, f"total_ms is 600 ms: {elapsed:.2f}s"
    else:
        assert elapsed < FAST_S, f"failover took {elapsed:.2f}s"

    assert_audit(gw, rid, status=200, attempts=2, fallback_used=1, model="llama-70b", provider="inhouse",
                 error_code="", stream=int(stream), model_requested=first)


def test_healthy_first_choice_is_one_attempt(gw, mock):
    """The control for the above: nothing fails, the first choice serves."""
    rid, h = rid_headers()
    r = post_chat(gw, chat_body(model="gpt-4o-mini"), key=FO, headers=h)
    assert r.status_code == 200, r.text
    got = {k: r.headers.get(k) for k in ("x-gateway-model", "x-gateway-provider", "x-gateway-attempts",
                                         "x-gateway-fallback")}
    assert got == {"x-gateway-model": "gpt-4o-mini", "x-gateway-provider": "openai", "x-gateway-attempts": "1",
                   "x-gateway-fallback": "false"}, got
    assert upstream_paths(mock) == [OPENAI_PATH]
    assert_audit(gw, rid, status=200, attempts=1, fallback_used=0, model="gpt-4o-mini", provider="openai")


def test_failover_runs_down_a_longer_chain(gw, mock):
    """Refused, then 503, then served by the third: every attempt counted."""
    rid, h = rid_headers(fail_first_once())
    r = post_chat(gw, chat_body(model="dead-model"), key=FO,
                  headers={**h, "x-gateway-fallback": "gpt-4o-mini,claude-haiku"})
    assert r.status_code == 200, r.text
    assert_served_by_fallback(r, model="claude-haiku", provider="anthropic", attempts=3)
    assert upstream_paths(mock) == [OPENAI_PATH, ANTHROPIC_PATH]
    assert_audit(gw, rid, status=200, attempts=3, fallback_used=1, model="claude-haiku", provider="anthropic")


# --------------------------------------------------------------------------- 2. client 4xx: no failover


@pytest.mark.parametrize("endpoint,model,path", [
    ("chat", "gpt-4o-mini", OPENAI_PATH),
    ("chat", "claude-haiku", ANTHROPIC_PATH),     # Anthropic's 400, in OpenAI format
    ("messages", "gpt-4o-mini", OPENAI_PATH),     # OpenAI's 400, in Anthropic format
], ids=["chat-openai", "chat-anthropic", "messages-openai"])
def test_client_4xx_from_provider_is_not_retried(gw, mock, endpoint, model, path):
    provider = {"gpt-4o-mini": "openai", "claude-haiku": "anthropic"}[model]
    n = TRIP_FAILURES + 2  # more than enough to open the circuit, were 4xx counted
    for i in range(n):
        rid, h = rid_headers({"x-mock": "status=400"})
        if endpoint == "chat":
            r = post_chat(gw, chat_body(model=model), key=FO, headers=h)
            assert r.status_code == 400, r.text
            body = json_body(r)
            assert set(body) == {"error"} and isinstance(body["error"].get("message"), str), body
            assert body["error"]["message"], body
        else:
            r = post_messages(gw, messages_body(model=model), key=FO, headers=h)
            assert_anthropic_error(r, 400, "invalid_request_error")
        assert r.headers.get("x-gateway-attempts") == "1", dict(r.headers)
        assert r.headers.get("x-gateway-fallback") != "true", dict(r.headers)
        if i == 0:
            assert_audit(gw, rid, status=400, attempts=1, fallback_used=0)
    assert upstream_paths(mock) == [path] * n, "a client error is not retried on the fallback (llama-70b)"
    view = providers(gw)[provider]
    assert view["circuit"] == "closed", view
    assert view["consecutive_failures"] == 0, view
    # ... and the provider still serves at once
    r = post_chat(gw, chat_body(model=model), key=FO)
    assert r.status_code == 200 and r.headers.get("x-gateway-attempts") == "1", r.text


# --------------------------------------------------------------------------- 3. everything down


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
def test_every_candidate_refused_is_a_fast_503(gw, mock, stream):
    rid, h = rid_headers({"x-gateway-fallback": "dead2-model"})
    r, elapsed = timed(post_chat, gw, chat_body(model="dead-model", stream=stream), key=FO, headers=h)
    err = assert_openai_error(r, 503, "upstream_unavailable")
    assert elapsed < FAST_S, f"two refused connections took {elapsed:.2f}s"
    ra = r.headers.get("retry-after", "")
    assert ra.isdigit() and int(ra) >= 1, f"503 needs retry-after, got {ra!r}"
    assert r.headers.get("x-gateway-attempts") == "2", dict(r.headers)
    msg = err["message"]
    assert "dead-model" in msg and "dead2-model" in msg and "2 attempts" in msg, msg
    assert upstream_paths(mock) == []
    assert_audit(gw, rid, status=503, attempts=2, error_code="upstream_unavailable")


@pytest.mark.parametrize("stream,slow", [(False, "slow-model"), (True, "slow-model"), (False, "slowoc-model")],
                         ids=["nonstream", "stream", "nonstream-as_client"])
def test_last_attempt_timed_out_is_504(gw, mock, slow_mock, stream, slow):
    rid, h = rid_headers({"x-gateway-fallback": slow})
    r, elapsed = timed(post_chat, gw, chat_body(model="dead-model", stream=stream), key=FO, headers=h)
    err = assert_openai_error(r, 504, "upstream_timeout")
    # Streamed upstream (every request, unless the provider opted out): the first token's
    # deadline; a non-streamed answer from an opted-out provider: the total.
    limit = (SLOW_TOTAL_MS if slow == "slowoc-model" else SLOW_FIRST_TOKEN_MS) / 1000
    assert limit - 0.05 <= elapsed < limit + 1.0, f"the slow provider's limit is {limit}s, took {elapsed:.2f}s"
    assert r.headers.get("x-gateway-attempts") == "2", dict(r.headers)
    msg = err["message"]
    assert "dead-model" in msg and slow in msg and "2 attempts" in msg, msg
    assert_audit(gw, rid, status=504, attempts=2, error_code="upstream_timeout")


@pytest.mark.parametrize("stalled", ["stall-model", "stall-head-model"])
def test_stalled_non_streaming_upstream_fails_over_within_first_token_ms(gw, mock, stub, stalled):
    """A non-streaming request whose first provider stalls (after its stream's header, or
    before any header) reaches the healthy fallback within first_token_ms + 1 s: it went
    upstream as a stream, so the first token's deadline applies, not total_ms (120 s
    here). The client still gets one JSON body, the fallback's."""
    stub_hits = len(stub.hits)
    rid, h = rid_headers()
    body = chat_body("Stalled first choice. [[mock: tokens=5]]", model=stalled)
    r, elapsed = timed(post_chat, gw, body, key=FO, headers=h)
    assert r.status_code == 200, r.text
    limit = STALLED_FIRST_TOKEN_MS / 1000
    assert limit - 0.05 <= elapsed < limit + 1.0, f"first_token_ms is {limit}s, took {elapsed:.2f}s"
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    answer = r.json()
    assert answer["object"] == "chat.completion"
    assert len(answer["choices"][0]["message"]["content"].split()) == 5
    assert answer["usage"]["completion_tokens"] == 5
    assert_served_by_fallback(r)
    assert len(stub.hits) - stub_hits == 1, stub.hits[stub_hits:]
    assert count(mock, INHOUSE_PATH) == 1
    assert_audit(gw, rid, status=200, attempts=2, fallback_used=1, model="llama-70b", provider="inhouse",
                 error_code="", stream=0, model_requested=stalled)


def test_first_timed_out_last_refused_is_503(gw, mock, slow_mock):
    """504 only when the LAST attempt timed out."""
    r, elapsed = timed(post_chat, gw, chat_body(model="slow-model"), key=FO,
                       headers={"x-gateway-fallback": "dead-model"})
    assert_openai_error(r, 503, "upstream_unavailable")
    assert elapsed < SLOW_TOTAL_MS / 1000 + 1.0
    assert r.headers.get("retry-after", "").isdigit()
    assert r.headers.get("x-gateway-attempts") == "2"


# --------------------------------------------------------------------------- 4. override header


def test_override_header_replaces_the_fallback_chain(gw, mock):
    # without the header: the tenant's fallback (llama-70b) serves
    r = post_chat(gw, chat_body(model="dead-model"), key=FO)
    assert r.status_code == 200, r.text
    assert_served_by_fallback(r, "llama-70b", "inhouse")
    assert upstream_paths(mock) == [INHOUSE_PATH]
    mock.reset()
    # with it: the header's chain replaces it, llama-70b is not called
    rid, h = rid_headers({"x-gateway-fallback": "claude-haiku"})
    r = post_chat(gw, chat_body(model="dead-model"), key=FO, headers=h)
    assert r.status_code == 200, r.text
    assert_served_by_fallback(r, "claude-haiku", "anthropic")
    assert upstream_paths(mock) == [ANTHROPIC_PATH]
    assert_audit(gw, rid, attempts=2, fallback_used=1, model="claude-haiku", provider="anthropic")


def test_override_header_refused_when_tenant_does_not_allow_it(gw, mock):
    r, elapsed = timed(post_chat, gw, chat_body(model="gpt-4o-mini"), key=STRICT,
                       headers={"x-gateway-fallback": "claude-haiku"})
    assert_openai_error(r, 403, "fallback_override_not_allowed")
    assert elapsed < FAST_S
    assert upstream_paths(mock) == []
    # on /v1/messages too, in Anthropic format
    r = post_messages(gw, messages_body(model="claude-haiku"), key=STRICT,
                      headers={"x-gateway-fallback": "llama-70b"})
    assert_anthropic_error(r, 403, "permission_error")
    assert upstream_paths(mock) == []


def test_override_header_with_unknown_model_is_400(gw, mock):
    r = post_chat(gw, chat_body(model="gpt-4o-mini"), key=FO, headers={"x-gateway-fallback": "llama-70b,gpt-17-ultra"})
    err = assert_openai_error(r, 400, "model_not_found")
    assert "gpt-17-ultra" in err["message"], err
    assert upstream_paths(mock) == []


# --------------------------------------------------------------------------- 5. region pin


def test_region_pin_never_calls_another_regions_provider(gw, mock):
    # eu-a fails once; the tenant's fallback is [gpt-4o-mini (us), llama-70b (us), eu-b (eu)]
    rid, h = rid_headers(fail_first_once())
    r = post_chat(gw, chat_body(model="eu-a"), key=EURO, headers=h)
    assert r.status_code == 200, r.text
    assert_served_by_fallback(r, "eu-b", "eu2", attempts=2)
    assert upstream_paths(mock) == ["/eu1/v1/chat/completions", "/eu2/v1/chat/completions"], \
        "us-east-1 models must not be tried by an eu-west-1 tenant, not even as fallbacks"
    assert_audit(gw, rid, attempts=2, model="eu-b", provider="eu2", region=EU)

    # the whole region down: 503, still no call outside it
    mock.reset()
    r = post_chat(gw, chat_body(model="eu-a"), key=EURO, headers={"x-mock": "status=503"})
    assert_openai_error(r, 503, "upstream_unavailable")
    assert r.headers.get("x-gateway-attempts") == "2", dict(r.headers)
    assert upstream_paths(mock) == ["/eu1/v1/chat/completions", "/eu2/v1/chat/completions"]

    # asking for a us model by name does not reach the us provider either
    mock.reset()
    r = post_chat(gw, chat_body(model="gpt-4o-mini"), key=EURO)
    assert r.status_code in (200, 403), r.text
    if r.status_code == 200:
        assert r.headers.get("x-gateway-provider") in ("eu1", "eu2"), dict(r.headers)
    else:
        assert_openai_error(r, 403, {"region_not_allowed", "model_not_allowed"})
    assert all(p.startswith(("/eu1/", "/eu2/")) for p in upstream_paths(mock)), upstream_paths(mock)


def test_region_pin_with_no_model_left_is_403(gw, mock):
    rid, h = rid_headers()
    r, elapsed = timed(post_chat, gw, chat_body(model="gpt-4o-mini"), key=APAC, headers=h)
    assert_openai_error(r, 403, "region_not_allowed")
    assert elapsed < FAST_S
    r = post_chat(gw, chat_body(model=None), key=APAC)
    assert_openai_error(r, 403, "region_not_allowed")
    assert upstream_paths(mock) == []
    assert_audit(gw, rid, status=403, error_code="region_not_allowed", attempts=0)


# --------------------------------------------------------------------------- 6. circuit breaker


def test_admin_providers_needs_the_token_and_lists_every_provider(gw):
    for h in ({}, {"authorization": "Bearer wrong-token"}):
        r = httpx.get(f"{gw.admin_url}/admin/v1/providers", headers=h, timeout=5)
        assert r.status_code == 401, (h, r.status_code, r.text)
    view = providers(gw)
    assert set(gw.config["providers"]) <= set(view), view.keys()
    for name, p in view.items():
        assert set(p) >= {"name", "kind", "region", "base_url", "circuit", "error_rate", "calls_in_window",
                          "consecutive_failures", "retry_after_s"}, p
        assert p["circuit"] == "closed", p
    assert view["eu1"]["region"] == EU and view["openai"]["kind"] == "openai", view


def test_circuit_opens_is_skipped_probes_once_and_closes(gw, mock):
    flaky = "/flaky/v1/chat/completions"
    # Tenant A (only flaky-model) sees five upstream failures.
    for _ in range(TRIP_FAILURES):
        r = post_chat(gw, chat_body(model=None), key=FLAKY_ONLY, headers={"x-mock": "status=503"})
        assert_openai_error(r, 503, "upstream_unavailable")
    assert count(mock, flaky) == TRIP_FAILURES
    view = providers(gw)
    assert view["flaky"]["circuit"] == "open", view["flaky"]
    assert view["flaky"]["consecutive_failures"] >= TRIP_FAILURES, view["flaky"]
    assert 1 <= view["flaky"]["retry_after_s"] <= OPEN_S, view["flaky"]
    assert view["inhouse"]["circuit"] == "closed", view["inhouse"]

    # Tenant B's chain starts with flaky-model: skipped without a connection, served by
    # its fallback at once (the breaker is shared by tenants).
    rid, h = rid_headers()
    r, elapsed = timed(post_chat, gw, chat_body(model="flaky-model"), key=FLAKY_FB, headers=h)
    assert r.status_code == 200, r.text
    assert elapsed < FAST_S, f"an open circuit must cost nothing, took {elapsed:.2f}s"
    assert r.headers.get("x-gateway-model") == "llama-70b", dict(r.headers)
    assert r.headers.get("x-gateway-fallback") == "true", dict(r.headers)
    assert r.headers.get("x-gateway-attempts") == "1", "the skipped candidate is no upstream attempt"
    assert count(mock, flaky) == TRIP_FAILURES, "an open circuit is skipped without contacting the provider"
    assert count(mock, INHOUSE_PATH) == 1
    assert_audit(gw, rid, status=200, model="llama-70b", fallback_used=1, attempts=1)

    # Tenant A's only candidate is open: a fast 503 with retry-after, no connection.
    rid, h = rid_headers()
    r, elapsed = timed(post_chat, gw, chat_body(model=None), key=FLAKY_ONLY, headers=h)
    err = assert_openai_error(r, 503, "upstream_unavailable")
    assert elapsed < FAST_S, f"took {elapsed:.2f}s"
    ra = r.headers.get("retry-after", "")
    assert ra.isdigit() and 1 <= int(ra) <= OPEN_S, f"retry-after {ra!r} should say when the probe is due"
    assert "flaky-model" in err["message"], err
    assert r.headers.get("x-gateway-attempts") == "0", dict(r.headers)
    assert count(mock, flaky) == TRIP_FAILURES
    assert_audit(gw, rid, status=503, error_code="upstream_unavailable", attempts=0)

    # Wait out the open period (that is what this part is about), watching the admin API.
    deadline = time.monotonic() + OPEN_S + 3
    while True:
        f = providers(gw)["flaky"]
        if f["circuit"] != "open" or f["retry_after_s"] == 0:
            break
        assert time.monotonic() < deadline, f"circuit still open after {OPEN_S + 3}s: {f}"
        time.sleep(0.1)
    assert count(mock, flaky) == TRIP_FAILURES, "nothing reaches an open provider while it waits"

    # Half-open: exactly one probe. Make it slow, and send another request meanwhile.
    probe: dict = {}

    def send_probe() -> None:
        probe["r"] = post_chat(gw, chat_body("Probe. [[mock: ttft_ms=800]]", model=None), key=FLAKY_ONLY)

    t = threading.Thread(target=send_probe)
    t.start()
    try:
        wait_until = time.monotonic() + 3
        while count(mock, flaky) < TRIP_FAILURES + 1:
            assert time.monotonic() < wait_until, "the probe never reached the provider"
            time.sleep(0.02)
        r, elapsed = timed(post_chat, gw, chat_body(model=None), key=FLAKY_ONLY)
        assert_openai_error(r, 503, "upstream_unavailable")
        assert elapsed < FAST_S
        assert r.headers.get("retry-after", "").isdigit()
        assert count(mock, flaky) == TRIP_FAILURES + 1, "half-open lets exactly one probe through"
    finally:
        t.join(timeout=10)
    pr = probe["r"]
    assert pr.status_code == 200, pr.text
    assert pr.headers.get("x-gateway-model") == "flaky-model" and pr.headers.get("x-gateway-attempts") == "1"

    # The probe succeeded: closed, and traffic flows again.
    view = providers(gw)["flaky"]
    assert view["circuit"] == "closed", view
    assert view["consecutive_failures"] == 0, view
    r = post_chat(gw, chat_body(model="flaky-model"), key=FLAKY_FB)
    assert r.status_code == 200, r.text
    assert r.headers.get("x-gateway-model") == "flaky-model", dict(r.headers)
    assert r.headers.get("x-gateway-fallback") == "false", dict(r.headers)
    assert count(mock, flaky) == TRIP_FAILURES + 2


def test_double_outage_is_bounded_fast_and_recovers_by_itself(gw, mock):
    """Primary and secondary both down while requests keep coming (the issue's
    ten-minute outage, compressed to the first open period): upstream attempts stay
    bounded by the breakers, clients get fast 503s whose retry-after tracks the next
    probe, and traffic returns on its own once the providers are back."""
    pa, pb = "/pa/v1/chat/completions", "/pb/v1/chat/completions"
    outage_s = 3.0
    results: list[tuple[float, int, str, str, float]] = []  # (t, status, retry-after, attempts, elapsed)

    c = httpx.Client(timeout=10)
    hdrs = {"authorization": f"Bearer {PAIR}", "content-type": "application/json"}

    def send(down: bool) -> httpx.Response:
        h = {**hdrs, "x-mock": "status=503"} if down else hdrs
        t = time.monotonic()
        r = c.post(f"{gw.base_url}/v1/chat/completions", headers=h, json=chat_body(model=None))
        results.append((t, r.status_code, r.headers.get("retry-after", ""), r.headers.get("x-gateway-attempts", ""),
                        time.monotonic() - t))
        return r

    t0 = time.monotonic()
    opened_at = None
    while time.monotonic() - t0 < outage_s:
        r = send(down=True)
        assert_openai_error(r, 503, "upstream_unavailable")
        if opened_at is None and count(mock, pa) >= TRIP_FAILURES:
            opened_at = time.monotonic()
        time.sleep(0.01)  # a steady stream of requests
    down_requests = len(results)
    assert opened_at is not None
    # Bounded: each provider saw the failures that opened its circuit, no more.
    assert count(mock, pa) == TRIP_FAILURES, upstream_paths(mock)
    assert count(mock, pb) == TRIP_FAILURES, upstream_paths(mock)
    assert down_requests > 10 * TRIP_FAILURES, f"only {down_requests} requests in {outage_s}s"
    view = providers(gw)
    assert view["pa"]["circuit"] == "open" and view["pb"]["circuit"] == "open", (view["pa"], view["pb"])
    for t, status, ra, attempts, elapsed in results:
        assert status == 503 and elapsed < FAST_S, (status, elapsed)
        assert ra.isdigit() and 1 <= int(ra) <= OPEN_S, f"retry-after {ra!r}"
        if t > opened_at + 0.05:
            assert attempts == "0", "with both circuits open nothing goes upstream"
            # retry-after follows the next probe (the open period counts down)
            due = OPEN_S - (t - opened_at)
            assert abs(int(ra) - due) <= 1.5, f"retry-after {ra} at {t - opened_at:.2f}s after opening"

    # The providers are back. Requests keep coming; the first probe after the open period
    # succeeds and traffic returns with no operator action.
    deadline = opened_at + OPEN_S + 2.5
    while True:
        r = send(down=False)
        if r.status_code == 200:
            break
        assert_openai_error(r, 503, "upstream_unavailable")
        assert time.monotonic() < deadline, "traffic did not come back after the open period"
        time.sleep(0.01)
    recovered_at = time.monotonic()
    assert recovered_at - opened_at >= OPEN_S - 0.5, "the circuit let traffic through before its open period"
    assert r.headers.get("x-gateway-model") == "pa-model", dict(r.headers)
    for _ in range(3):
        r = send(down=False)
        assert r.status_code == 200 and r.headers.get("x-gateway-model") == "pa-model", r.text
    # Over the whole outage: the opening failures, one probe and the traffic after it.
    assert count(mock, pa) == TRIP_FAILURES + 4, upstream_paths(mock)
    assert count(mock, pb) == TRIP_FAILURES
    assert providers(gw)["pa"]["circuit"] == "closed"
    c.close()


def test_retry_budget_caps_failover_load(gw, mock):
    """Every request's first choice refuses connections (five different providers, in turn,
    so that no circuit opens): failover is granted from the budget (initial balance 10
    retries, +0.2 per request), then refused, so the fallback's extra load stays bounded."""
    n = 20
    statuses = []
    for i in range(n):
        r = post_chat(gw, chat_body(model=DEAD_FOR_BUDGET[i % len(DEAD_FOR_BUDGET)]), key=BUDGET)
        statuses.append((r.status_code, r.headers.get("x-gateway-attempts")))
        if r.status_code != 200:
            assert_openai_error(r, 503, "upstream_unavailable")
            assert r.headers.get("x-gateway-attempts") == "1", "no failover without budget"
    failovers = sum(1 for s, _ in statuses if s == 200)
    assert all(a == "2" for s, a in statuses if s == 200), statuses
    assert count(mock, INHOUSE_PATH) == failovers
    assert failovers >= 10, f"the initial budget allows 10 failovers: {statuses}"
    assert failovers <= 10 + 0.2 * n, f"failover beyond the budget: {statuses}"
    assert failovers < n, "the budget never ran out"
    assert all(p["circuit"] == "closed" for name, p in providers(gw).items() if name.startswith("dead")), \
        "the test needs closed circuits to measure the budget"


# --------------------------------------------------------------------------- 7. after the first byte

# Tokens spaced out, so that the first ones have reached the client when the failure
# comes (with no gap, tokens and failure can reach the gateway in one read, before
# anything was sent to the client, and failing over is then allowed).
MIDSTREAM_GAP_MS = 30


@pytest.mark.parametrize("fault", ["cut", "midstream_error"])
def test_chat_stream_failure_after_first_byte_is_an_error_event(gw, mock, fault):
    rid, h = rid_headers()
    body = chat_body(f"[[mock: fault={fault}; cut_after=3; tokens=10; gap_ms={MIDSTREAM_GAP_MS}]]",
                     model="gpt-4o-mini", stream=True)
    r, events, _ = stream_chat(gw, body, key=FO, headers=h)
    assert r.status_code == 200, r.text
    data = [d for _, d in events]
    assert data and "[DONE]" not in data, f"an upstream failure mid-stream must not end cleanly: {data[-3:]}"
    last = json.loads(data[-1])
    assert set(last) == {"error"} and isinstance(last["error"].get("message"), str), last
    chunks = [json.loads(d) for d in data[:-1]]
    assert len(content_of_chunks(chunks).split()) == 3, "the tokens before the failure reached the client"
    assert r.headers.get("x-gateway-attempts") == "1" and r.headers.get("x-gateway-fallback") == "false"
    assert upstream_paths(mock) == [OPENAI_PATH], "no failover after the first byte"
    row = assert_audit(gw, rid, attempts=1, fallback_used=0, model="gpt-4o-mini", status=200)
    assert row["error_code"], f"the audit row must say the stream failed: {row}"


@pytest.mark.parametrize("fault", ["cut", "midstream_error"])
def test_messages_stream_failure_after_first_byte_is_an_error_event(gw, mock, fault):
    rid, h = rid_headers()
    body = messages_body(f"[[mock: fault={fault}; cut_after=3; tokens=10; gap_ms={MIDSTREAM_GAP_MS}]]",
                         model="claude-haiku", stream=True)
    r, events = stream_messages(gw, body, key=FO, headers=h)
    assert r.status_code == 200, r.text
    names = [n for n, _ in events]
    assert names and names[-1] == "error", f"expected a final `event: error`, got {names}"
    assert "message_stop" not in names, names
    assert isinstance(events[-1][1], dict) and events[-1][1].get("type") == "error", events[-1]
    assert len(text_of_anthropic_events(events).split()) == 3
    assert r.headers.get("x-gateway-attempts") == "1"
    assert upstream_paths(mock) == [ANTHROPIC_PATH], "no failover after the first byte"
    row = assert_audit(gw, rid, attempts=1, fallback_used=0, model="claude-haiku", endpoint="messages")
    assert row["error_code"], f"the audit row must say the stream failed: {row}"


# --------------------------------------------------------------------------- 8. /v1/messages


def test_messages_failover_with_the_anthropic_sdk(gw, mock):
    """Refused first choice, native Anthropic fallback; the SDK sees the gateway's headers."""
    rid = new_request_id("fo-sdk")
    client = Anthropic(base_url=gw.base_url, api_key=FO, max_retries=0, timeout=15)
    raw = client.messages.with_raw_response.create(
        model="dead-model", max_tokens=50, messages=[{"role": "user", "content": "Hi. [[mock: tokens=4]]"}],
        extra_headers={"x-gateway-fallback": "claude-haiku", "x-request-id": rid})
    msg = raw.parse()
    assert msg.type == "message" and msg.content and msg.content[0].text.strip()
    h = raw.headers
    got = {k: h.get(k) for k in ("x-gateway-model", "x-gateway-provider", "x-gateway-attempts", "x-gateway-fallback")}
    assert got == {"x-gateway-model": "claude-haiku", "x-gateway-provider": "anthropic", "x-gateway-attempts": "2",
                   "x-gateway-fallback": "true"}, got
    assert upstream_paths(mock) == [ANTHROPIC_PATH]
    assert_audit(gw, rid, endpoint="messages", attempts=2, fallback_used=1, model="claude-haiku",
                 provider="anthropic", status=200)


def test_messages_stream_failover_to_an_openai_model(gw, mock):
    """claude-haiku answers 503 once; llama-70b (OpenAI format upstream) serves the
    stream, translated to Anthropic events, with the failover headers."""
    rid, h = rid_headers(fail_first_once())
    r, events = stream_messages(gw, messages_body("Hi. [[mock: tokens=4]]", model="claude-haiku", stream=True),
                                key=FO, headers=h)
    assert r.status_code == 200, r.text
    assert_served_by_fallback(r)
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-1] == "message_stop", names
    assert text_of_anthropic_events(events).strip()
    assert upstream_paths(mock) == [ANTHROPIC_PATH, INHOUSE_PATH]
    assert_audit(gw, rid, endpoint="messages", attempts=2, fallback_used=1, model="llama-70b")


def test_messages_every_candidate_down_is_503_in_anthropic_format(gw, mock):
    r, elapsed = timed(post_messages, gw, messages_body(model="dead-model"), key=FO,
                       headers={"x-gateway-fallback": "dead2-model"})
    err = assert_anthropic_error(r, 503)
    assert elapsed < FAST_S
    assert r.headers.get("retry-after", "").isdigit()
    assert r.headers.get("x-gateway-attempts") == "2"
    assert "dead-model" in err["message"] and "dead2-model" in err["message"], err


# --------------------------------------------------------------------------- 4 MiB bodies


def _big_prompt(n_bytes: int) -> str:
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega "
    return (words * (n_bytes // len(words) + 1))[:n_bytes]


@pytest.mark.parametrize("stream", [False, True], ids=["nonstream", "stream"])
@pytest.mark.parametrize("trigger,first,extra", [
    ("refused", "dead-model", lambda: {}),
    ("503", "gpt-4o-mini", lambda: fail_first_once()),
])
def test_a_4mib_body_fails_over_whole(gw, mock, trigger, first, extra, stream):
    """A body just under the 4 MiB default limit (64 times Pingora's retry buffer)
    reaches the fallback whole after the first choice refused or answered 503: the
    directive at its very end is obeyed, and the fallback got every byte."""
    rid, h = rid_headers(extra())
    prompt = _big_prompt(4 * (1 << 20) - 16 * 1024) + " [[mock: tokens=5]]"
    body = chat_body(prompt, model=first, stream=stream)
    sent = len(json.dumps(body).encode())
    if stream:
        r, events, _ = stream_chat(gw, body, key=FO, headers=h)
        assert r.status_code == 200, r.text[:300]
        assert content_of_chunks(chunks_of(events)).strip()
    else:
        r = post_chat(gw, body, key=FO, headers=h)
        assert r.status_code == 200, r.text[:300]
        assert r.json()["usage"]["completion_tokens"] == 5, "the body's tail reached the fallback"
    assert_served_by_fallback(r)
    rec = mock.only_request(INHOUSE_PATH)
    assert sent - 1000 <= rec["body_len"] <= sent + 1000, (sent, rec["body_len"])
    if trigger == "503":
        [first_try] = [q for q in mock.requests() if q["path"] == OPENAI_PATH]
        assert sent - 1000 <= first_try["body_len"] <= sent + 1000, (sent, first_try["body_len"])
    assert_audit(gw, rid, status=200, attempts=2, fallback_used=1, model="llama-70b")


def _attempts_metric(gw) -> dict[tuple[str, str], float]:
    text = httpx.get(gw.admin_url + "/metrics", timeout=5).text
    return {(m[1], m[2]): float(m[3]) for m in re.finditer(
        r'^llmgw_upstream_attempts_total\{provider="([^"]+)",result="([^"]+)"\} (\S+)$', text, re.M)}


def test_every_attempt_is_counted_also_the_ones_a_fallback_rescued(gw, mock):
    """`llmgw_upstream_attempts_total` shows a primary failing behind a working fallback
    (the request itself succeeded, so `llmgw_upstream_failures_total` does not)."""
    dead_provider = gw.config["models"]["dead-model"]["provider"]
    before = _attempts_metric(gw)
    _, h = rid_headers(fail_first_once())
    r = post_chat(gw, chat_body("count my attempts [[mock: tokens=3]]", model="gpt-4o-mini"), key=FO, headers=h)
    assert r.status_code == 200, r.text
    _, h = rid_headers()
    r = post_chat(gw, chat_body("count my attempts [[mock: tokens=3]]", model="dead-model"), key=FO, headers=h)
    assert r.status_code == 200, r.text
    after = _attempts_metric(gw)

    def delta(provider, result):
        return after.get((provider, result), 0) - before.get((provider, result), 0)

    assert delta("openai", "status_5xx") == 1, after
    assert delta(dead_provider, "connect") == 1, after
    assert delta("inhouse", "ok") == 2, after
