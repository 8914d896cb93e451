"""Bad input and upstream failures answer with the contract's status and OpenAI error
body, quickly."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from helpers import (ACME, MAX_ERROR_LATENCY_S, SOLO, assert_openai_error, chat_body, post_chat)

UPSTREAM_DOWN = {"bad_upstream_response", "upstream_unavailable"}


def _overrides(closed_port: int, openai_streaming: str = "always") -> dict:
    return {
        "max_body_bytes": 1048576,
        "providers": {
            "openai": {"timeouts": {"connect_ms": 1000, "first_token_ms": 500, "idle_ms": 1000, "total_ms": 1500},
                       "upstream_streaming": openai_streaming},
            "dead": {
                "kind": "openai_compatible",
                "base_url": f"http://127.0.0.1:{closed_port}",
                "region": "us-east-1",
                "timeouts": {"connect_ms": 1000, "first_token_ms": 1000, "idle_ms": 1000, "total_ms": 5000},
            },
        },
        "models": {"dead-model": {"provider": "dead", "price": {"input_per_mtok": 0.1, "output_per_mtok": 0.1}}},
        "tenants": {"acme": {"models": ["gpt-4o-mini", "llama-70b", "claude-haiku", "dead-model"]}},
    }


@pytest.fixture(scope="module")
def gw(gateway, closed_port):
    """Standard config plus a model whose provider refuses connections, and an `openai`
    provider that gives up waiting for the first byte after 500 ms."""
    return gateway(_overrides(closed_port))


@pytest.fixture(scope="module")
def gw_as_client(gateway, closed_port):
    """The same, with the `openai` provider opted out of upstream streaming."""
    return gateway(_overrides(closed_port, "as_client"))


def timed(fn, *a, **kw):
    t0 = time.monotonic()
    r = fn(*a, **kw)
    elapsed = time.monotonic() - t0
    return r, elapsed


def fast(fn, *a, **kw):
    r, elapsed = timed(fn, *a, **kw)
    assert elapsed < MAX_ERROR_LATENCY_S, f"took {elapsed:.2f}s"
    return r


def test_malformed_json(gw, mock):
    r = fast(post_chat, gw, b'{"model": "gpt-4o-mini", "messages": [')
    assert_openai_error(r, 400, "invalid_request")
    assert mock.requests() == []


def test_body_not_an_object(gw):
    assert_openai_error(fast(post_chat, gw, b'["hello"]'), 400, "invalid_request")


def test_empty_body(gw):
    assert_openai_error(fast(post_chat, gw, b""), 400, "invalid_request")


def test_missing_messages(gw, mock):
    r = fast(post_chat, gw, {"model": "gpt-4o-mini"})
    err = assert_openai_error(r, 400, "invalid_request")
    assert "messages" in err["message"]
    assert mock.requests() == []


def test_messages_not_an_array(gw):
    assert_openai_error(fast(post_chat, gw, {"model": "gpt-4o-mini", "messages": "hi"}), 400, "invalid_request")


def test_unknown_model(gw, mock):
    r = fast(post_chat, gw, chat_body(model="gpt-17-ultra"))
    assert_openai_error(r, 400, "model_not_found")
    assert mock.requests() == []


def test_model_not_allowed_for_tenant(gw, mock):
    r = fast(post_chat, gw, chat_body(model="llama-70b"), key=SOLO)
    assert_openai_error(r, 403, "model_not_allowed")
    assert mock.requests() == []


def test_missing_key(gw, mock):
    assert_openai_error(fast(post_chat, gw, chat_body(), key=None), 401, "invalid_api_key")
    assert mock.requests() == []


@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_wrong_key(gw, mock, header):
    h = {"authorization": "Bearer sk-wrong"} if header == "authorization" else {"x-api-key": "sk-wrong"}
    r = fast(post_chat, gw, chat_body(), key=None, headers=h)
    assert_openai_error(r, 401, "invalid_api_key")
    assert mock.requests() == []


def test_wrong_key_on_models(gw):
    r = fast(httpx.get, f"{gw.base_url}/v1/models", headers={"authorization": "Bearer sk-wrong"}, timeout=10)
    assert_openai_error(r, 401, "invalid_api_key")


def test_auth_is_checked_before_the_body(gw):
    # a bad key with a bad body is still a 401: no information for unauthenticated callers
    r = fast(post_chat, gw, b"not json", key="sk-wrong")
    assert_openai_error(r, 401, "invalid_api_key")


def test_oversize_body(gw, mock):
    body = chat_body("x" * 1_200_000)
    r = fast(post_chat, gw, body)
    assert_openai_error(r, 413, "request_too_large")
    assert mock.requests() == []


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_upstream_connection_refused(gw, mock, stream):
    r = fast(post_chat, gw, chat_body(model="dead-model", stream=stream))
    assert r.status_code in (502, 503), r.text
    assert_openai_error(r, r.status_code, UPSTREAM_DOWN)
    if r.status_code == 503:
        assert r.headers.get("retry-after", "").isdigit(), "503 carries retry-after"


def test_upstream_timeout(gw, mock):
    """A non-streaming request goes upstream as a stream; the mock sends its headers, then
    nothing, so first_token_ms (0.5 s here), not total_ms (1.5 s), bounds the wait."""
    r, elapsed = timed(post_chat, gw, chat_body("Take your time. [[mock: fault=stall]]"))
    assert_openai_error(r, 504, "upstream_timeout")
    assert 0.4 <= elapsed < 1.4, f"first_token_ms is 500 but the answer took {elapsed:.2f}s"
    reqs = mock.requests()
    assert len(reqs) == 1 and reqs[0]["stream"] is True


def test_upstream_timeout_as_client(gw_as_client, mock):
    """A provider opted out of upstream streaming gets the request as sent: its answer
    arrives in one piece, so total_ms (1.5 s here) bounds it."""
    r, elapsed = timed(post_chat, gw_as_client, chat_body("Take your time. [[mock: fault=stall]]"))
    assert_openai_error(r, 504, "upstream_timeout")
    assert 1.4 <= elapsed < MAX_ERROR_LATENCY_S, f"total_ms is 1500 but the answer took {elapsed:.2f}s"
    reqs = mock.requests()
    assert len(reqs) == 1 and reqs[0]["stream"] is False


def test_upstream_timeout_streaming(gw, mock):
    """The mock sends the stream's headers, then nothing. The gateway holds the response
    until the first token, so the client gets a clean 504 after first_token_ms (0.5 s),
    not a started stream."""
    r, elapsed = timed(post_chat, gw, chat_body("Take your time. [[mock: fault=stall]]", stream=True))
    assert 0.4 <= elapsed < 1.4, f"first_token_ms is 500 but the answer took {elapsed:.2f}s"
    assert_openai_error(r, 504, "upstream_timeout")


@pytest.mark.parametrize("fault", ["cut", "midstream_error"])
def test_stream_failure_after_first_byte_ends_with_error_event(gw, mock, fault):
    body = chat_body(f"[[mock: fault={fault}; cut_after=3; tokens=10]]", stream=True)
    r = fast(post_chat, gw, body)
    assert r.status_code == 200, r.text
    data = [ln[5:].strip() for ln in r.text.splitlines() if ln.startswith("data:")]
    assert "[DONE]" not in data, f"an upstream failure mid-stream must not end cleanly: {r.text[-500:]}"
    last = json.loads(data[-1])
    # cut: the gateway's own event; midstream_error: the provider's, passed on in the same format
    assert set(last) == {"error"} and isinstance(last["error"].get("message"), str), last
    if fault == "cut":
        assert last["error"]["code"] in UPSTREAM_DOWN, last
    content = "".join(c["choices"][0]["delta"].get("content") or ""
                      for c in map(json.loads, data[:-1]) if c.get("choices"))
    assert len(content.split()) == 3, "the tokens before the failure reached the client"


def test_garbage_from_upstream_is_502(gw, mock):
    r = fast(post_chat, gw, chat_body("[[mock: fault=garbage]]"))
    assert_openai_error(r, 502, "bad_upstream_response")


def test_gateway_still_serves_after_errors(gw, mock):
    """The process survived every bad input above. (The faults above opened the circuit
    of the `openai` provider, as they should: ask a model on another provider.)"""
    r = fast(post_chat, gw, chat_body(model="llama-70b"))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
