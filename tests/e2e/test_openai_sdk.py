"""The gateway driven through the official `openai` Python SDK (and raw HTTP where the
SDK hides what is on the wire)."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
from openai import OpenAI

from helpers import (ACME, GLOBEX, SOLO, chat_body, chunks_of, content_of_chunks, header_of, header_pairs,
                     post_chat, stream_chat)

PROMPT = [{"role": "user", "content": "Tell me something deterministic."}]


@pytest.fixture(scope="module")
def gw(gateway):
    return gateway()


def sdk(gw, key: str = ACME) -> OpenAI:
    return OpenAI(base_url=gw.base_url + "/v1", api_key=key, max_retries=0, timeout=15)


def assert_no_tenant_key_upstream(rec: dict) -> None:
    for name, value in header_pairs(rec):
        for k in (ACME, GLOBEX, SOLO):
            assert k not in value, f"tenant key forwarded upstream in header {name!r}"


def test_non_streaming_completion_has_content_and_usage(gw, mock):
    resp = sdk(gw).chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
    assert resp.object == "chat.completion"
    assert resp.choices and resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content, "empty completion"
    assert resp.choices[0].finish_reason == "stop"
    u = resp.usage
    assert u is not None and u.prompt_tokens > 0 and u.completion_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    rec = mock.only_request("/v1/chat/completions")
    # sent upstream as a stream with usage, assembled into the one body asked for
    assert rec["stream"] is True and rec["include_usage"] is True


def test_assembled_non_streaming_answer_is_the_providers_own(gateway, gw, mock):
    """Through the SDK, a non-streaming answer assembled from the upstream stream equals
    the one the provider sends non-streamed (a gateway whose provider opted out with
    `upstream_streaming: as_client`, the old path): same content, finish reason, usage
    (with its detail objects), fingerprint, and the same members in the same order.
    The one difference is the provider's: the mock, like OpenAI, puts an empty
    `annotations` list in non-streamed messages that its streams never carry."""
    as_client = gateway({"providers": {"openai": {"upstream_streaming": "as_client"}}})
    got = {}
    for name, g in (("assembled", gw), ("as_client", as_client)):
        mock.reset()
        raw = sdk(g).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=PROMPT)
        assert raw.headers["content-type"] == "application/json"
        assert int(raw.headers["content-length"]) == len(raw.content)
        got[name] = (json.loads(raw.content), raw.parse())
        assert mock.only_request("/v1/chat/completions")["stream"] is (name == "assembled")
    (body, resp), (plain_body, plain) = got["assembled"], got["as_client"]
    assert plain_body["choices"][0]["message"].pop("annotations") == []
    for b in (body, plain_body):
        b.pop("id"), b.pop("created")
    assert json.dumps(body) == json.dumps(plain_body), (body, plain_body)
    assert resp.choices[0].message.content == plain.choices[0].message.content
    assert resp.usage == plain.usage
    assert resp.usage.completion_tokens_details.reasoning_tokens == 0
    assert resp.usage.prompt_tokens_details.cached_tokens == 0


def test_streaming_equals_non_streaming_and_usage_is_stripped(gw, mock):
    c = sdk(gw)
    full = c.chat.completions.create(model="gpt-4o-mini", messages=PROMPT).choices[0].message.content
    mock.reset()
    chunks = list(c.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, stream=True))
    assert len(chunks) >= 3, f"a 16-token reply should come in several chunks, got {len(chunks)}"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == full
    assert all(ch.usage is None for ch in chunks), "client did not ask for usage but got a usage chunk"
    assert all(ch.choices for ch in chunks), "a chunk without choices (the usage chunk) reached the client"
    # ... while the gateway did ask upstream for usage, to count tokens.
    rec = mock.only_request("/v1/chat/completions")
    assert rec["stream"] is True
    assert rec["include_usage"] is True, rec


def test_raw_stream_without_include_usage_has_no_usage_member(gw, mock):
    r, events, _ = stream_chat(gw, chat_body(stream=True))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = chunks_of(events)
    assert content_of_chunks(chunks)
    for c in chunks:
        assert "usage" not in c, f"usage member leaked to a client that did not ask for it: {c}"
    assert mock.only_request("/v1/chat/completions")["include_usage"] is True


def test_streaming_with_include_usage_has_exactly_one_usage_chunk(gw, mock):
    c = sdk(gw)
    full = c.chat.completions.create(model="gpt-4o-mini", messages=PROMPT).choices[0].message.content
    chunks = list(c.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, stream=True,
                                            stream_options={"include_usage": True}))
    with_usage = [ch for ch in chunks if ch.usage is not None]
    assert len(with_usage) == 1, f"expected one usage chunk, got {len(with_usage)}"
    assert with_usage[0] is chunks[-1], "the usage chunk is the last one"
    assert with_usage[0].choices == []
    u = with_usage[0].usage
    assert u.prompt_tokens > 0 and u.completion_tokens > 0
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == full


def test_models_list_is_the_tenants(gw):
    ids = [m.id for m in sdk(gw).models.list()]
    assert sorted(ids) == sorted(["gpt-4o-mini", "llama-70b", "claude-haiku"])
    assert [m.id for m in sdk(gw, SOLO).models.list()] == ["gpt-4o-mini"]
    assert [m.id for m in sdk(gw, GLOBEX).models.list()] == ["llama-70b"]


@pytest.mark.parametrize("stream", [False, True])
def test_model_rewritten_and_provider_credential_injected(gw, mock, stream):
    c = sdk(gw)
    if stream:
        assert list(c.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, stream=True))
    else:
        assert c.chat.completions.create(model="gpt-4o-mini", messages=PROMPT).choices
    rec = mock.only_request()
    assert rec["path"] == "/v1/chat/completions"
    assert rec["method"] == "POST"
    assert rec["model"] == "gpt-4o-mini-2024-07-18"
    assert header_of(rec, "authorization") == "Bearer sk-upstream-openai"
    assert_no_tenant_key_upstream(rec)


def test_x_api_key_auth_works_and_is_not_forwarded(gw, mock):
    r = post_chat(gw, chat_body(), key=None, headers={"x-api-key": ACME})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    rec = mock.only_request()
    assert header_of(rec, "authorization") == "Bearer sk-upstream-openai"
    assert_no_tenant_key_upstream(rec)


def test_openai_compatible_path_prefix(gw, mock):
    raw = sdk(gw).chat.completions.with_raw_response.create(model="llama-70b", messages=PROMPT)
    assert raw.headers["x-gateway-model"] == "llama-70b"
    assert raw.headers["x-gateway-provider"] == "inhouse"
    assert raw.parse().choices[0].message.content
    rec = mock.only_request()
    assert rec["path"] == "/inhouse/v1/chat/completions"
    assert rec["model"] == "llama-70b"  # upstream_model defaults to the public name
    assert_no_tenant_key_upstream(rec)


def test_streaming_through_openai_compatible_provider(gw, mock):
    chunks = list(sdk(gw).chat.completions.create(model="llama-70b", messages=PROMPT, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert mock.only_request()["path"] == "/inhouse/v1/chat/completions"


def test_default_model_is_first_allowed(gw, mock):
    r = post_chat(gw, chat_body(model=None))
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-model"] == "gpt-4o-mini"
    assert mock.only_request()["model"] == "gpt-4o-mini-2024-07-18"


def test_pinned_tenant_is_served_by_pinned_model(gw, mock):
    raw = sdk(gw, GLOBEX).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=PROMPT)
    assert raw.http_response.status_code == 200
    assert raw.headers["x-gateway-model"] == "llama-70b"
    assert raw.parse().choices[0].message.content
    rec = mock.only_request()
    assert rec["path"] == "/inhouse/v1/chat/completions"
    assert rec["model"] == "llama-70b"


def test_gateway_response_headers(gw):
    raw = sdk(gw).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=PROMPT)
    h = raw.headers
    assert h["x-gateway-model"] == "gpt-4o-mini"
    assert h["x-gateway-provider"] == "openai"
    assert h["x-gateway-attempts"] == "1"
    assert h["x-gateway-fallback"] == "false"


def test_request_id_echoed_when_sent(gw, mock):
    raw = sdk(gw).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=PROMPT, extra_headers={"x-request-id": "e2e-req-0001"})
    assert raw.headers["x-request-id"] == "e2e-req-0001"
    # also on a streamed response and on an error
    r, _, _ = stream_chat(gw, chat_body(stream=True), headers={"x-request-id": "e2e-req-0002"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "e2e-req-0002"
    r = post_chat(gw, chat_body(model="no-such-model"), headers={"x-request-id": "e2e-req-0003"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "e2e-req-0003"


def test_request_id_generated_when_absent(gw):
    ids = []
    for _ in range(2):
        r = post_chat(gw, chat_body())
        assert r.status_code == 200, r.text
        rid = r.headers.get("x-request-id")
        assert rid and len(rid) <= 128 and re.fullmatch(r"[\x21-\x7e]+", rid), rid
        ids.append(rid)
    assert ids[0] != ids[1], "generated request ids must be unique"
    r = httpx.get(f"{gw.base_url}/v1/models", headers={"authorization": f"Bearer {ACME}"}, timeout=10)
    assert r.status_code == 200 and r.headers.get("x-request-id")


def test_sdk_maps_gateway_errors_to_its_exceptions(gw):
    with pytest.raises(openai.AuthenticationError):
        sdk(gw, "sk-not-a-tenant").chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
    with pytest.raises(openai.PermissionDeniedError):
        sdk(gw, SOLO).chat.completions.create(model="llama-70b", messages=PROMPT)
    with pytest.raises(openai.BadRequestError) as e:
        sdk(gw).chat.completions.create(model="no-such-model", messages=PROMPT)
    assert e.value.code == "model_not_found"
