"""Upstream HTTP/2: a provider reached over `https://` is offered `h2` by ALPN and spoken
to in HTTP/2 (`http2: auto`, the default), and in HTTP/1.1 with `http2: off`; answers and
streams are the same either way. The upstream is the mock provider in TLS mode
(`tls_mock`), which records the HTTP version each request arrived with; the gateway
trusts the mock's test CA through `SSL_CERT_FILE`.

The `auto` tests need the gateway's per-attempt request path (Pingora's HTTP connector
driven directly); the subrequest path forces HTTP/1.1 upstream."""

from __future__ import annotations

import time

import httpx
import pytest
from openai import OpenAI

from certs import client_context
from helpers import ACME

GAP_MS = 150
TOKENS = 6
CHAT = "/v1/chat/completions"


@pytest.fixture
def upstream(tls_mock):
    """The TLS mock, its request log empty."""
    return tls_mock("h2")


def gateway_to(gateway, upstream, http2: str | None = None):
    """A gateway whose `openai` provider is the TLS mock (`http2` absent: the default)."""
    provider = {"base_url": upstream.url}
    if http2 is not None:
        provider["http2"] = http2
    return gateway({"providers": {"openai": provider}}, env={"SSL_CERT_FILE": str(upstream.ca)})


def sdk(gw) -> OpenAI:
    return OpenAI(base_url=gw.base_url + "/v1", api_key=ACME, max_retries=0, timeout=15)


def direct_answer(upstream, prompt: str) -> str:
    """What the mock itself answers `prompt` (it is deterministic), asked directly over
    HTTPS, so the gateway's answer can be compared with it; the log is cleared after."""
    with httpx.Client(verify=client_context(upstream.ca), timeout=10) as c:
        r = c.post(upstream.url + CHAT, json={"model": "gpt-4o-mini",
                                              "messages": [{"role": "user", "content": prompt}]})
    r.raise_for_status()
    upstream.reset()
    return r.json()["choices"][0]["message"]["content"]


def upstream_version(upstream) -> str:
    return upstream.only_request(CHAT)["http_version"]


def non_streaming(gw, upstream) -> None:
    prompt = "hello upstream [[mock: tokens=4]]"
    expected = direct_answer(upstream, prompt)
    resp = sdk(gw).chat.completions.create(model="gpt-4o-mini",
                                           messages=[{"role": "user", "content": prompt}])
    assert resp.choices[0].message.content == expected
    assert resp.usage.completion_tokens == 4


def streaming(gw, upstream) -> None:
    """The stream arrives token by token (spread over the mock's gaps), with the text the
    mock answers directly."""
    prompt = f"count upstream [[mock: gap_ms={GAP_MS}; tokens={TOKENS}]]"
    expected = direct_answer(upstream, prompt)
    arrivals, text = [], ""
    stream = sdk(gw).chat.completions.create(model="gpt-4o-mini", stream=True,
                                             messages=[{"role": "user", "content": prompt}])
    for chunk in stream:
        for ch in chunk.choices:
            if ch.delta.content:
                arrivals.append(time.monotonic())
                text += ch.delta.content
    assert text == expected
    assert len(arrivals) >= TOKENS - 1, arrivals
    assert arrivals[-1] - arrivals[0] >= (TOKENS - 2) * GAP_MS / 1000, arrivals


def test_auto_is_the_default_and_non_streaming_goes_over_h2(gateway, upstream):
    gw = gateway_to(gateway, upstream)
    non_streaming(gw, upstream)
    assert upstream_version(upstream) == "HTTP/2.0"


def test_auto_streams_incrementally_over_h2(gateway, upstream):
    gw = gateway_to(gateway, upstream, "auto")
    streaming(gw, upstream)
    assert upstream_version(upstream) == "HTTP/2.0"


def test_off_non_streaming_stays_http11(gateway, upstream):
    gw = gateway_to(gateway, upstream, "off")
    non_streaming(gw, upstream)
    assert upstream_version(upstream) == "HTTP/1.1"


def test_off_streams_incrementally_over_http11(gateway, upstream):
    gw = gateway_to(gateway, upstream, "off")
    streaming(gw, upstream)
    assert upstream_version(upstream) == "HTTP/1.1"
