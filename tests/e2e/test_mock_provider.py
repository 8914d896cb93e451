"""`llm-gateway mock-provider` on its own: the official SDKs accept its wire formats, and
its per-request controls (latency, length, status, faults) do what they say."""

from __future__ import annotations

import hashlib
import json
import time

import anthropic
import httpx
import openai
import pytest
from anthropic import Anthropic
from openai import OpenAI

from conftest import _stop, start_mock
from helpers import chunks_of, content_of_chunks, header_of, sse_events

PROMPT = "Describe the mock."
MSGS = [{"role": "user", "content": PROMPT}]
T = httpx.Timeout(10.0, connect=3.0)


def oai(mock, prefix: str = "") -> OpenAI:
    return OpenAI(base_url=f"{mock.url}{prefix}/v1", api_key="sk-upstream-openai", max_retries=0, timeout=10)


def ant(mock) -> Anthropic:
    return Anthropic(base_url=mock.url, api_key="sk-upstream-anthropic", max_retries=0, timeout=10)


def raw_chat(mock, body: dict, headers: dict | None = None, timeout=T) -> httpx.Response:
    with httpx.Client(timeout=timeout) as c:
        return c.post(f"{mock.url}/v1/chat/completions", json=body, headers=headers or {})


def test_openai_non_streaming(mock):
    r = oai(mock).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert r.object == "chat.completion" and r.model == "gpt-4o-mini"
    text = r.choices[0].message.content
    assert len(text.split()) == 16
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens > 0
    assert r.choices[0].finish_reason == "stop"
    # deterministic
    assert oai(mock).chat.completions.create(model="gpt-4o-mini", messages=MSGS).choices[0].message.content == text


def test_openai_streaming_and_usage(mock):
    c = oai(mock)
    full = c.chat.completions.create(model="m", messages=MSGS).choices[0].message.content
    chunks = list(c.chat.completions.create(model="m", messages=MSGS, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == full
    assert all(ch.usage is None for ch in chunks)
    chunks = list(c.chat.completions.create(model="m", messages=MSGS, stream=True,
                                            stream_options={"include_usage": True}))
    usage = [ch for ch in chunks if ch.usage]
    assert len(usage) == 1 and usage[0] is chunks[-1] and usage[0].usage.completion_tokens == 16


def test_path_suffix_match_and_request_log(mock):
    r = oai(mock, "/inhouse").chat.completions.create(model="llama-70b", messages=MSGS, max_tokens=5)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    rec = mock.only_request()
    assert rec["path"] == "/inhouse/v1/chat/completions" and rec["method"] == "POST"
    assert rec["model"] == "llama-70b" and rec["stream"] is False
    assert rec["max_tokens"] == 5 and rec["messages_count"] == 1
    assert header_of(rec, "authorization") == "Bearer sk-upstream-openai"
    assert isinstance(rec["body_len"], int) and len(rec["body_sha256"]) == 64


def test_request_log_hash_stats_and_reset(mock):
    body = json.dumps({"model": "m", "messages": MSGS, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    with httpx.Client(timeout=T) as c:
        assert c.post(f"{mock.url}/v1/chat/completions", content=body,
                      headers={"content-type": "application/json"}).status_code == 200
    rec = mock.only_request()
    assert rec["body_len"] == len(body)
    assert rec["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert rec["stream"] is True and rec["include_usage"] is True
    assert mock.stats()["requests"] >= 1
    mock.reset()
    assert mock.requests() == [] and mock.stats()["requests"] == 0


def test_anthropic_sdk_non_streaming(mock):
    m = ant(mock).messages.create(model="claude-haiku-mock", max_tokens=100, messages=MSGS)
    assert m.type == "message" and m.role == "assistant"
    assert m.content[0].type == "text" and len(m.content[0].text.split()) == 16
    assert m.stop_reason == "end_turn"
    assert m.usage.input_tokens > 0 and m.usage.output_tokens == 16
    # same prompt text, same words in both formats
    o = oai(mock).chat.completions.create(model="x", messages=MSGS).choices[0].message.content
    assert m.content[0].text == o
    rec = mock.requests()[0]
    assert rec["path"] == "/v1/messages"
    # this SDK version authenticates with a bearer token; older ones send x-api-key
    assert "sk-upstream-anthropic" in (header_of(rec, "x-api-key") or header_of(rec, "authorization") or "")


def test_anthropic_sdk_streaming(mock):
    c = ant(mock)
    full = c.messages.create(model="claude", max_tokens=100, messages=MSGS).content[0].text
    with c.messages.stream(model="claude", max_tokens=100, messages=MSGS) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == full
    assert final.usage.output_tokens == 16 and final.stop_reason == "end_turn"


def test_anthropic_event_sequence(mock):
    body = {"model": "claude", "max_tokens": 100, "stream": True, "messages": MSGS}
    with httpx.Client(timeout=T) as c, c.stream("POST", f"{mock.url}/v1/messages", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        names = [ln[6:].strip() for ln in r.iter_lines() if ln.startswith("event:")]
    assert names[0] == "message_start"
    assert names[1] == "content_block_start"
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert names.count("content_block_delta") == 16


def test_anthropic_requires_max_tokens(mock):
    with httpx.Client(timeout=T) as c:
        r = c.post(f"{mock.url}/v1/messages", json={"model": "claude", "messages": MSGS})
    assert r.status_code == 400
    assert r.json()["type"] == "error"


def test_directive_in_prompt_and_header(mock):
    r = raw_chat(mock, {"model": "m", "messages": [{"role": "user", "content": "hi [[mock: tokens=5]]"}]})
    assert r.json()["usage"]["completion_tokens"] == 5
    r = raw_chat(mock, {"model": "m", "messages": [{"role": "user", "content": "hi [[mock: tokens=5]]"}]},
                 headers={"x-mock": "tokens=3"})
    assert r.json()["usage"]["completion_tokens"] == 3


def test_status_directive(mock):
    with pytest.raises(openai.RateLimitError):
        oai(mock).chat.completions.create(model="m", messages=[{"role": "user", "content": "[[mock: status=429]]"}])
    with pytest.raises(anthropic.InternalServerError):
        ant(mock).messages.create(model="c", max_tokens=10,
                                  messages=[{"role": "user", "content": "[[mock: status=503]]"}])


def test_fail_first(mock):
    body = {"model": "m", "messages": [{"role": "user", "content": "[[mock: fail_first=2; key=ff-e2e]]"}]}
    assert [raw_chat(mock, body).status_code for _ in range(3)] == [503, 503, 200]


def test_usage_none(mock):
    r = raw_chat(mock, {"model": "m", "messages": [{"role": "user", "content": "[[mock: usage=none]]"}]})
    assert r.status_code == 200 and "usage" not in r.json()


def test_ttft_and_gap(mock):
    body = {"model": "m", "stream": True,
            "messages": [{"role": "user", "content": "[[mock: ttft_ms=300; gap_ms=50; tokens=6]]"}]}
    with httpx.Client(timeout=T) as c:
        t0 = time.monotonic()
        with c.stream("POST", f"{mock.url}/v1/chat/completions", json=body) as r:
            events = list(sse_events(r.iter_lines()))
    chunks = chunks_of(events)
    assert len(content_of_chunks(chunks).split()) == 6
    assert events[0][0] - t0 >= 0.29
    assert events[-1][0] - events[0][0] >= 0.2


def test_fault_reset(mock):
    with pytest.raises(httpx.TransportError):
        raw_chat(mock, {"model": "m", "messages": [{"role": "user", "content": "[[mock: fault=reset]]"}]})


def test_fault_stall(mock):
    with pytest.raises(httpx.ReadTimeout):
        raw_chat(mock, {"model": "m", "messages": [{"role": "user", "content": "[[mock: fault=stall]]"}]},
                 timeout=httpx.Timeout(1.0))


def test_fault_garbage(mock):
    r = raw_chat(mock, {"model": "m", "messages": [{"role": "user", "content": "[[mock: fault=garbage]]"}]})
    assert r.status_code == 200
    with pytest.raises(ValueError):
        json.loads(r.text)


def test_fault_cut_stream(mock):
    body = {"model": "m", "stream": True,
            "messages": [{"role": "user", "content": "[[mock: fault=cut; cut_after=3; tokens=10]]"}]}
    seen = []
    with pytest.raises(httpx.TransportError):
        with httpx.Client(timeout=T) as c, c.stream("POST", f"{mock.url}/v1/chat/completions", json=body) as r:
            for ln in r.iter_lines():
                seen.append(ln)
    assert "data: [DONE]" not in seen


def test_fault_midstream_error(mock):
    body = {"model": "m", "stream": True,
            "messages": [{"role": "user", "content": "[[mock: fault=midstream_error; cut_after=2]]"}]}
    with httpx.Client(timeout=T) as c, c.stream("POST", f"{mock.url}/v1/chat/completions", json=body) as r:
        data = [d for _, d in sse_events(r.iter_lines())]
    assert "[DONE]" not in data
    last = json.loads(data[-1])
    assert "error" in last
    content = [json.loads(d) for d in data[:-1]]
    assert len(content_of_chunks(content).split()) == 2


def test_command_line_defaults(gateway_bin, session_tmp):
    m = start_mock(gateway_bin, session_tmp / "mock-provider-cli.log", "--tokens", "4", "--ttft-ms", "200")
    try:
        t0 = time.monotonic()
        r = raw_chat(m, {"model": "m", "messages": MSGS})
        assert time.monotonic() - t0 >= 0.19
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        _stop([m.proc])
