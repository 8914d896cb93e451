"""Anthropic both ways: the official `anthropic` SDK on `POST /v1/messages` against
Anthropic-backed (native) and OpenAI-backed (translated) models, the official `openai`
SDK on `/v1/chat/completions` against an Anthropic-backed model, tool calls both ways,
errors and mid-stream failures in the endpoint's own format."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest
from anthropic import Anthropic
from openai import OpenAI

from helpers import (ACME, GLOBEX, SOLO, assert_anthropic_error, assert_openai_error, chat_body, chunks_of,
                     content_of_chunks, header_of, header_pairs, keep_circuit_closed, messages_body, post_chat,
                     post_messages, stream_chat, stream_messages, text_of_anthropic_events)

ANT_MODEL = "claude-haiku"
ANT_UPSTREAM = "claude-3-5-haiku-20241022"
ANT_MAX_OUTPUT = 4096  # the test config's max_output_tokens of claude-haiku
OPENAI_KIND = {
    # public model -> (upstream path, upstream model)
    "gpt-4o-mini": ("/v1/chat/completions", "gpt-4o-mini-2024-07-18"),
    "llama-70b": ("/inhouse/v1/chat/completions", "llama-70b"),
}
TOOLS_OPENAI = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
TOOLS_ANTHROPIC = [{
    "name": "get_weather",
    "description": "Weather of a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}]
MOCK_TOOL_ARGS = {"x": 1}  # what the mock provider puts in every tool call


@pytest.fixture(scope="module")
def gw(gateway):
    return gateway()


# Streams failed on purpose count against the providers' circuit breakers; they run on a
# gateway process of their own (same config; the override only restates the standard
# region) so they cannot open a circuit under another test module.
FAULT_GATEWAY = {"node": {"region": "us-east-1"}}


@pytest.fixture(scope="module")
def fault_gw(gateway):
    return gateway(FAULT_GATEWAY)


def ant(gw, key: str = ACME, **kw) -> Anthropic:
    return Anthropic(base_url=gw.base_url, api_key=key, max_retries=0, timeout=15, **kw)


def oai(gw, key: str = ACME) -> OpenAI:
    return OpenAI(base_url=gw.base_url + "/v1", api_key=key, max_retries=0, timeout=15)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assert_no_tenant_key_upstream(rec: dict) -> None:
    for name, value in header_pairs(rec):
        for k in (ACME, GLOBEX, SOLO):
            assert k not in value, f"tenant key forwarded upstream in header {name!r}"


def assert_anthropic_upstream(rec: dict) -> None:
    assert rec["path"] == "/v1/messages", rec
    assert rec["model"] == ANT_UPSTREAM, rec
    assert header_of(rec, "x-api-key") == "sk-upstream-anthropic", rec["headers"]
    assert header_of(rec, "anthropic-version"), "Anthropic needs an anthropic-version header"
    assert_no_tenant_key_upstream(rec)


# --------------------------------------------------------------------------- 1. native /v1/messages


def test_messages_native_non_stream(gw, mock):
    raw = ant(gw).messages.with_raw_response.create(
        model=ANT_MODEL, max_tokens=100, messages=user("Native, please. [[mock: tokens=6]]"))
    assert raw.headers["x-gateway-model"] == ANT_MODEL
    assert raw.headers["x-gateway-provider"] == "anthropic"
    m = raw.parse()
    assert m.type == "message" and m.role == "assistant"
    assert [b.type for b in m.content] == ["text"]
    assert len(m.content[0].text.split()) == 6
    assert m.stop_reason == "end_turn"
    assert m.usage.input_tokens > 0 and m.usage.output_tokens == 6
    rec = mock.only_request()
    assert_anthropic_upstream(rec)
    # a non-streaming request goes upstream as a stream, assembled by the gateway
    assert rec["stream"] is True
    assert rec["max_tokens"] == 100


def test_messages_native_stream_equals_non_stream(gw, mock):
    c = ant(gw)
    msgs = user("Native stream. [[mock: tokens=6]]")
    full = c.messages.create(model=ANT_MODEL, max_tokens=100, messages=msgs)
    mock.reset()
    with c.messages.stream(model=ANT_MODEL, max_tokens=100, messages=msgs) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == full.content[0].text
    assert final.content[0].text == full.content[0].text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 6
    assert final.usage.input_tokens == full.usage.input_tokens
    rec = mock.only_request()
    assert_anthropic_upstream(rec)
    assert rec["stream"] is True


def test_messages_native_stream_event_sequence(gw, mock):
    r, events = stream_messages(gw, messages_body("Events. [[mock: tokens=4]]", stream=True))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    names = [n for n, _ in events]
    assert names[0] == "message_start", names
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"], names
    assert names.count("content_block_delta") == 4
    for n, d in events:
        assert isinstance(d, dict) and d.get("type") == n, (n, d)
    assert len(text_of_anthropic_events(events).split()) == 4


def test_anthropic_beta_and_version_reach_upstream(gw, mock):
    ant(gw).messages.create(model=ANT_MODEL, max_tokens=50, messages=user("Beta. [[mock: tokens=2]]"),
                            extra_headers={"anthropic-beta": "prompt-caching-2024-07-31",
                                           "anthropic-version": "2023-06-01"})
    rec = mock.only_request()
    assert_anthropic_upstream(rec)
    assert header_of(rec, "anthropic-beta") == "prompt-caching-2024-07-31"
    assert header_of(rec, "anthropic-version") == "2023-06-01"


def test_messages_x_api_key_auth(gw, mock):
    """The contract's second auth form; the tenant's key is never forwarded."""
    r = post_messages(gw, messages_body("x-api-key auth. [[mock: tokens=2]]"), key=None,
                      headers={"x-api-key": ACME})
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "message"
    rec = mock.only_request()
    assert_anthropic_upstream(rec)


# --------------------------------------------------------------------------- 2. /v1/messages translated


@pytest.mark.parametrize("model", sorted(OPENAI_KIND))
def test_messages_on_openai_kind_model(gw, mock, model):
    path, upstream_model = OPENAI_KIND[model]
    c = ant(gw)
    msgs = user("Translate me. [[mock: tokens=6]]")
    raw = c.messages.with_raw_response.create(model=model, max_tokens=100, messages=msgs)
    assert raw.headers["x-gateway-model"] == model
    m = raw.parse()
    assert m.type == "message" and m.role == "assistant"
    assert [b.type for b in m.content] == ["text"]
    text = m.content[0].text
    assert len(text.split()) == 6
    assert m.stop_reason == "end_turn"
    assert m.usage.input_tokens > 0 and m.usage.output_tokens == 6
    rec = mock.only_request()
    assert rec["path"] == path
    assert rec["model"] == upstream_model
    # sent upstream as a stream with usage, assembled into the one body asked for
    assert rec["stream"] is True and rec["include_usage"] is True
    assert rec["max_tokens"] == 100
    assert rec["messages_count"] == 1
    assert_no_tenant_key_upstream(rec)
    if model == "gpt-4o-mini":
        assert header_of(rec, "authorization") == "Bearer sk-upstream-openai"

    mock.reset()
    with c.messages.stream(model=model, max_tokens=100, messages=msgs) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 6
    rec = mock.only_request()
    assert rec["path"] == path and rec["model"] == upstream_model
    assert rec["stream"] is True
    assert rec["include_usage"] is True, "the gateway asks OpenAI-kind upstreams for stream usage"

    # the mock derives its words from the prompt text only: the same prompt served natively
    # by the Anthropic model gives the same words, so the translation kept the prompt intact
    native = c.messages.create(model=ANT_MODEL, max_tokens=100, messages=msgs)
    assert native.content[0].text == text


def test_messages_translated_stream_event_sequence(gw, mock):
    r, events = stream_messages(gw, messages_body("Events. [[mock: tokens=4]]", model="gpt-4o-mini",
                                                  stream=True))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    names = [n for n, _ in events]
    assert names[0] == "message_start", names
    assert "content_block_start" in names
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"], names
    for n, d in events:
        assert isinstance(d, dict) and d.get("type") == n, (n, d)
    assert len(text_of_anthropic_events(events).split()) == 4
    delta = [d for n, d in events if n == "message_delta"][0]
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"]["output_tokens"] == 4


def test_messages_translated_stop_reason_max_tokens(gw, mock):
    m = ant(gw).messages.create(model="gpt-4o-mini", max_tokens=3, messages=user("Long. [[mock: tokens=8]]"))
    assert m.stop_reason == "max_tokens"
    assert m.usage.output_tokens == 3
    assert mock.only_request()["max_tokens"] == 3


def test_messages_system_prompt_translated(gw, mock):
    """`system` becomes a system message upstream: same words as the native call."""
    c = ant(gw)
    kw = dict(max_tokens=100, system="You are terse.", messages=user("System test. [[mock: tokens=5]]"))
    native = c.messages.create(model=ANT_MODEL, **kw).content[0].text
    mock.reset()
    translated = c.messages.create(model="gpt-4o-mini", **kw).content[0].text
    assert translated == native
    assert mock.only_request()["messages_count"] == 2


# --------------------------------------------------------------------------- 3. openai SDK -> Anthropic


def test_chat_on_anthropic_model_non_stream(gw, mock):
    raw = oai(gw).chat.completions.with_raw_response.create(
        model=ANT_MODEL, messages=user("Chat to Claude. [[mock: tokens=6]]"))
    assert raw.headers["x-gateway-model"] == ANT_MODEL
    assert raw.headers["x-gateway-provider"] == "anthropic"
    resp = raw.parse()
    assert resp.object == "chat.completion"
    msg = resp.choices[0].message
    assert msg.role == "assistant" and len(msg.content.split()) == 6
    assert resp.choices[0].finish_reason == "stop"
    u = resp.usage
    assert u.prompt_tokens > 0 and u.completion_tokens == 6
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    rec = mock.only_request()
    assert_anthropic_upstream(rec)
    assert rec["stream"] is True, "non-streaming requests go upstream as streams"
    # Anthropic requires max_tokens: the client sent none, the model's cap is used
    assert rec["max_tokens"] == ANT_MAX_OUTPUT


def test_chat_on_anthropic_model_stream(gw, mock):
    c = oai(gw)
    msgs = user("Stream from Claude. [[mock: tokens=6]]")
    full = c.chat.completions.create(model=ANT_MODEL, messages=msgs)
    mock.reset()
    chunks = list(c.chat.completions.create(model=ANT_MODEL, messages=msgs, stream=True))
    assert len(chunks) >= 3
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == full.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert all(ch.usage is None for ch in chunks), "client did not ask for usage"
    rec = mock.only_request()
    assert_anthropic_upstream(rec)
    assert rec["stream"] is True
    assert rec["max_tokens"] == ANT_MAX_OUTPUT


def test_chat_on_anthropic_model_stream_with_usage(gw, mock):
    c = oai(gw)
    msgs = user("Usage from Claude. [[mock: tokens=5]]")
    full = c.chat.completions.create(model=ANT_MODEL, messages=msgs)
    chunks = list(c.chat.completions.create(model=ANT_MODEL, messages=msgs, stream=True,
                                            stream_options={"include_usage": True}))
    with_usage = [ch for ch in chunks if ch.usage is not None]
    assert len(with_usage) == 1 and with_usage[0] is chunks[-1], "one usage chunk, the last"
    assert with_usage[0].choices == []
    assert with_usage[0].usage.completion_tokens == 5
    assert with_usage[0].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_on_anthropic_model_raw_stream_ends_with_done(gw, mock):
    r, events, _ = stream_chat(gw, chat_body("Raw Claude stream. [[mock: tokens=4]]", model=ANT_MODEL,
                                             stream=True))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = chunks_of(events)
    assert len(content_of_chunks(chunks).split()) == 4
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"


def test_chat_on_anthropic_model_finish_reason_length(gw, mock):
    resp = oai(gw).chat.completions.create(model=ANT_MODEL, max_tokens=3,
                                           messages=user("Long Claude. [[mock: tokens=8]]"))
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 3
    assert mock.only_request()["max_tokens"] == 3


def test_chat_system_message_becomes_top_level_system(gw, mock):
    """The system message leaves `messages` (one message upstream) and arrives as the
    top-level `system`: the mock answers exactly as to the native request with `system=`."""
    prompt = "System to Claude. [[mock: tokens=5]]"
    resp = oai(gw).chat.completions.create(
        model=ANT_MODEL, messages=[{"role": "system", "content": "You are terse."}, *user(prompt)])
    rec = mock.only_request()
    assert rec["path"] == "/v1/messages"
    assert rec["messages_count"] == 1, "the system message must not stay in messages"
    mock.reset()
    native = ant(gw).messages.create(model=ANT_MODEL, max_tokens=100, system="You are terse.",
                                     messages=user(prompt))
    assert resp.choices[0].message.content == native.content[0].text
    assert resp.usage.prompt_tokens == native.usage.input_tokens


# --------------------------------------------------------------------------- 4. tool calls


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_openai_tools_on_anthropic_model(gw, mock, stream):
    c = oai(gw)
    msgs = user("What's the weather in Paris? [[mock: tool=*]]")
    if not stream:
        resp = c.chat.completions.create(model=ANT_MODEL, messages=msgs, tools=TOOLS_OPENAI)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls"
        calls = choice.message.tool_calls
        assert calls and len(calls) == 1
        call = calls[0]
        assert call.type == "function" and call.id
        name, args = call.function.name, call.function.arguments
    else:
        chunks = list(c.chat.completions.create(model=ANT_MODEL, messages=msgs, tools=TOOLS_OPENAI, stream=True))
        name, args, call_id, finishes = "", "", None, []
        for ch in chunks:
            if not ch.choices:
                continue
            d = ch.choices[0].delta
            for tc in d.tool_calls or []:
                assert tc.index == 0
                call_id = call_id or tc.id
                if tc.function and tc.function.name:
                    name += tc.function.name
                if tc.function and tc.function.arguments:
                    args += tc.function.arguments
            if ch.choices[0].finish_reason:
                finishes.append(ch.choices[0].finish_reason)
        assert call_id, "the tool call carries an id"
        assert finishes == ["tool_calls"]
    assert name == "get_weather"
    assert json.loads(args) == MOCK_TOOL_ARGS
    rec = mock.only_request()
    assert rec["path"] == "/v1/messages"


def test_openai_tool_round_trip_on_anthropic_model(gw, mock):
    """The tool call and its result go back as Anthropic tool_use / tool_result blocks: the
    mock answers exactly as to the same conversation sent natively in Anthropic format.
    (The second turn offers no tools, so the mock answers with text although the first
    user message still carries `tool=*`.)"""
    c = oai(gw)
    q = "Weather in Oslo? [[mock: tool=*]]"
    first = c.chat.completions.create(model=ANT_MODEL, messages=user(q), tools=TOOLS_OPENAI)
    call = first.choices[0].message.tool_calls[0]
    result = "Sunny, 21C. [[mock: tokens=4]]"
    convo = [
        *user(q),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    mock.reset()
    second = c.chat.completions.create(model=ANT_MODEL, messages=convo)
    rec = mock.only_request()
    assert rec["path"] == "/v1/messages"
    assert rec["messages_count"] == 3, "user, assistant tool_use, user tool_result"
    assert second.choices[0].finish_reason == "stop"
    assert len(second.choices[0].message.content.split()) == 4
    native = ant(gw).messages.create(model=ANT_MODEL, max_tokens=ANT_MAX_OUTPUT, messages=[
        *user(q),
        {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.function.name,
                                           "input": json.loads(call.function.arguments)}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": result}]},
    ])
    assert second.choices[0].message.content == native.content[0].text
    assert second.usage.prompt_tokens == native.usage.input_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_anthropic_tools_on_openai_model(gw, mock, stream):
    c = ant(gw)
    kw = dict(model="gpt-4o-mini", max_tokens=200, tools=TOOLS_ANTHROPIC,
              messages=user("Weather in Rome? [[mock: tool=*]]"))
    if stream:
        with c.messages.stream(**kw) as s:
            m = s.get_final_message()
    else:
        m = c.messages.create(**kw)
    assert m.stop_reason == "tool_use"
    uses = [b for b in m.content if b.type == "tool_use"]
    assert len(uses) == 1
    assert uses[0].name == "get_weather" and uses[0].id
    assert uses[0].input == MOCK_TOOL_ARGS
    rec = mock.only_request()
    assert rec["path"] == "/v1/chat/completions"
    assert rec["model"] == "gpt-4o-mini-2024-07-18"


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_required_tool_choice_on_openai_model_stops_for_tool_use(gw, mock, stream):
    """`tool_choice: any` goes upstream as OpenAI `required`, which gpt-4o-mini answers with
    tool calls under `finish_reason: "stop"` (so does the mock): the client must still get
    `stop_reason: "tool_use"`, or its tool loop ends early."""
    c = ant(gw)
    kw = dict(model="gpt-4o-mini", max_tokens=200, tools=TOOLS_ANTHROPIC, tool_choice={"type": "any"},
              messages=user("Weather in Kyiv? [[mock: tool=*]]"))
    if stream:
        with c.messages.stream(**kw) as s:
            m = s.get_final_message()
    else:
        m = c.messages.create(**kw)
    assert [b.type for b in m.content] == ["tool_use"]
    assert m.content[0].input == MOCK_TOOL_ARGS
    assert m.stop_reason == "tool_use"
    assert mock.only_request()["path"] == "/v1/chat/completions"


def test_anthropic_tool_round_trip_on_openai_model(gw, mock):
    c = ant(gw)
    q = "Weather in Lima? [[mock: tool=*]]"
    first = c.messages.create(model="gpt-4o-mini", max_tokens=200, tools=TOOLS_ANTHROPIC, messages=user(q))
    use = [b for b in first.content if b.type == "tool_use"][0]
    result = "Cloudy, 18C. [[mock: tokens=4]]"
    convo = [
        *user(q),
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": result}]},
    ]
    mock.reset()
    # without tools offered in the second turn the mock answers with text
    second = c.messages.create(model="gpt-4o-mini", max_tokens=200, messages=convo)
    rec = mock.only_request()
    assert rec["path"] == "/v1/chat/completions"
    assert rec["messages_count"] == 3, "user, assistant tool_calls, tool"
    assert second.stop_reason == "end_turn"
    assert [b.type for b in second.content] == ["text"]
    # same conversation sent natively in OpenAI format: same words
    native = oai(gw).chat.completions.create(model="gpt-4o-mini", messages=[
        *user(q),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": use.id, "type": "function", "function": {"name": use.name, "arguments": json.dumps(use.input, separators=(",", ":"))}}]},
        {"role": "tool", "tool_call_id": use.id, "content": result},
    ])
    assert second.content[0].text == native.choices[0].message.content
    assert second.usage.input_tokens == native.usage.prompt_tokens


# --------------------------------------------------------------------------- 5. errors in the endpoint's format


# A provider error arrives before any byte reached the client, so even a streaming request
# gets a plain JSON error; a broken re-rendering shows up as a hang, hence the short timeout.
ERR_TIMEOUT = httpx.Timeout(5.0, connect=3.0)


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_provider_400_on_messages_via_openai_model_is_anthropic_error(gw, mock, stream):
    r = post_messages(gw, messages_body("Bad. [[mock: status=400]]", model="gpt-4o-mini", stream=stream),
                      timeout=ERR_TIMEOUT)
    assert_anthropic_error(r, 400, "invalid_request_error")
    assert mock.only_request()["path"] == "/v1/chat/completions"


def test_provider_400_on_messages_via_openai_model_sdk_exception(gw, mock):
    with pytest.raises(anthropic.BadRequestError):
        ant(gw).messages.create(model="gpt-4o-mini", max_tokens=50, messages=user("Bad. [[mock: status=400]]"))


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_provider_400_on_chat_via_anthropic_model_is_openai_error(gw, mock, stream):
    r = post_chat(gw, chat_body("Bad. [[mock: status=400]]", model=ANT_MODEL, stream=stream), timeout=ERR_TIMEOUT)
    assert_openai_error(r, 400, "invalid_request")
    assert mock.only_request()["path"] == "/v1/messages"


def test_provider_400_on_chat_via_anthropic_model_sdk_exception(gw, mock):
    with pytest.raises(openai.BadRequestError):
        oai(gw).chat.completions.create(model=ANT_MODEL, messages=user("Bad. [[mock: status=400]]"))


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_provider_400_on_native_messages_is_anthropic_error(gw, mock, stream):
    r = post_messages(gw, messages_body("Bad. [[mock: status=400]]", stream=stream), timeout=ERR_TIMEOUT)
    assert_anthropic_error(r, 400, "invalid_request_error")


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_gateway_errors_on_messages_are_anthropic_format(gw, mock, stream):
    body = messages_body("Hi.", stream=stream)
    assert_anthropic_error(post_messages(gw, body, key="sk-not-a-tenant"), 401, "authentication_error")
    assert_anthropic_error(post_messages(gw, body, key=None), 401, "authentication_error")
    assert_anthropic_error(post_messages(gw, body, key=None, headers={"x-api-key": "sk-not-a-tenant"}), 401,
                           "authentication_error")
    assert_anthropic_error(post_messages(gw, messages_body("Hi.", model="no-such-model", stream=stream)), 400,
                           "invalid_request_error")
    assert_anthropic_error(post_messages(gw, b'{"model": "claude-haiku", "messages": ['), 400,
                           "invalid_request_error")
    assert_anthropic_error(post_messages(gw, messages_body("Hi.", model="llama-70b", stream=stream), key=SOLO),
                           403, "permission_error")
    assert mock.requests() == []


def test_gateway_errors_map_to_anthropic_sdk_exceptions(gw):
    with pytest.raises(anthropic.AuthenticationError):
        ant(gw, "sk-not-a-tenant").messages.create(model=ANT_MODEL, max_tokens=10, messages=user("hi"))
    with pytest.raises(anthropic.BadRequestError):
        ant(gw).messages.create(model="no-such-model", max_tokens=10, messages=user("hi"))
    with pytest.raises(anthropic.PermissionDeniedError):
        ant(gw, SOLO).messages.create(model="llama-70b", max_tokens=10, messages=user("hi"))


def test_unsupported_content_type_on_chat_to_anthropic_is_400_naming_the_field(gw, mock):
    body = {"model": ANT_MODEL, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}
    err = assert_openai_error(post_chat(gw, body), 400, "invalid_request")
    assert "messages[0].content[0]" in err["message"], err
    assert mock.requests() == []


def test_unsupported_content_type_on_messages_to_openai_is_400_naming_the_field(gw, mock):
    body = {"model": "gpt-4o-mini", "max_tokens": 50, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "hi"}}]}]}
    err = assert_anthropic_error(post_messages(gw, body), 400, "invalid_request_error")
    assert "messages[0].content[0]" in err["message"], err
    assert mock.requests() == []


# --------------------------------------------------------------------------- 6. mid-stream failures


def _openai_stream_raw(gw, model: str, prompt: str) -> list[str]:
    keep_circuit_closed(gw, model)
    r = post_chat(gw, chat_body(prompt, model=model, stream=True))
    assert r.status_code == 200, r.text
    return [ln[5:].strip() for ln in r.text.splitlines() if ln.startswith("data:")]


@pytest.mark.parametrize("fault", ["cut", "midstream_error"])
@pytest.mark.parametrize("model", [ANT_MODEL, "gpt-4o-mini"])
def test_chat_stream_failure_ends_with_openai_error_event(fault_gw, mock, model, fault):
    data = _openai_stream_raw(fault_gw, model, f"Fail midway. [[mock: fault={fault}; cut_after=3; tokens=10; gap_ms=20]]")
    assert data, "empty stream"
    assert "[DONE]" not in data, f"an upstream failure mid-stream must not end cleanly: {data[-3:]}"
    last = json.loads(data[-1])
    assert set(last) == {"error"}, last
    assert isinstance(last["error"].get("message"), str) and last["error"]["message"], last
    chunks = [json.loads(d) for d in data[:-1]]
    assert all("error" not in c for c in chunks)
    assert len(content_of_chunks(chunks).split()) == 3, "the tokens before the failure reached the client"
    assert not any(ch.get("finish_reason") for c in chunks for ch in c.get("choices") or []), \
        "no finish_reason for a stream that failed"


@pytest.mark.parametrize("fault", ["cut", "midstream_error"])
@pytest.mark.parametrize("model", [ANT_MODEL, "gpt-4o-mini"])
def test_messages_stream_failure_ends_with_anthropic_error_event(fault_gw, mock, model, fault):
    keep_circuit_closed(fault_gw, model)
    r, events = stream_messages(fault_gw, messages_body(f"Fail midway. [[mock: fault={fault}; cut_after=3; tokens=10; gap_ms=20]]",
                                                  model=model, stream=True))
    assert r.status_code == 200, r.text
    names = [n for n, _ in events]
    assert names and names[0] == "message_start", names
    assert names[-1] == "error", f"the stream must end with an error event: {names}"
    assert "message_stop" not in names, names
    err = events[-1][1]
    assert isinstance(err, dict) and err.get("type") == "error", err
    assert isinstance(err.get("error"), dict) and err["error"].get("type") and err["error"].get("message"), err
    assert len(text_of_anthropic_events(events).split()) == 3, "the tokens before the failure reached the client"


@pytest.mark.parametrize("model", [ANT_MODEL, "gpt-4o-mini"])
def test_anthropic_sdk_raises_on_failed_stream(fault_gw, mock, model):
    keep_circuit_closed(fault_gw, model)
    with pytest.raises(anthropic.APIError):
        with ant(fault_gw).messages.stream(model=model, max_tokens=100,
                                     messages=user("SDK fail. [[mock: fault=midstream_error; cut_after=2; tokens=8; gap_ms=20]]")) as s:
            for _ in s.text_stream:
                pass
            s.get_final_message()
