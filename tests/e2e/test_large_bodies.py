"""Bodies far above Pingora's 64 KiB retry buffer reach the upstream intact, streamed and
not, sent with Content-Length and chunked; above `max_body_bytes` the answer is 413."""

from __future__ import annotations

import json

import httpx
import pytest

from helpers import ACME, assert_openai_error, chunks_of, content_of_chunks

KB = 1000
MIB = 1 << 20
# Each request, even a 3 MiB one, must be answered within this.
TIMEOUT = httpx.Timeout(20.0, connect=3.0)
# The directive sits at the very end of the big message: the mock obeys it only if the
# whole body arrived and parsed.
TAIL_TOKENS = 7
TAIL = f" [[mock: tokens={TAIL_TOKENS}]]"


def big_text(n_bytes: int) -> str:
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega "
    return (words * (n_bytes // len(words) + 1))[:n_bytes]


def big_body(n_bytes: int, stream: bool, model: str = "gpt-4o-mini") -> dict:
    return {
        "model": model,
        "stream": stream,
        "messages": [
            {"role": "system", "content": "You are a summariser."},
            {"role": "user", "content": big_text(n_bytes) + TAIL},
        ],
    }


def chunked(data: bytes, piece: int = 64 * 1024):
    for i in range(0, len(data), piece):
        yield data[i:i + piece]


def send(gw, body: dict, transfer: str, stream: bool):
    """Sends `body` with Content-Length or chunked; returns (status, headers, parsed reply)."""
    raw = json.dumps(body).encode()
    content = raw if transfer == "content-length" else chunked(raw)
    headers = {"content-type": "application/json", "authorization": f"Bearer {ACME}"}
    with httpx.Client(timeout=TIMEOUT) as c:
        with c.stream("POST", f"{gw.base_url}/v1/chat/completions", headers=headers, content=content) as r:
            r.read()
            if transfer == "chunked":
                assert "content-length" not in r.request.headers
                assert r.request.headers.get("transfer-encoding") == "chunked"
            if r.status_code != 200:
                return r, len(raw), None
            if not stream:
                return r, len(raw), r.json()
            events = [ln[5:].strip() for ln in r.text.splitlines() if ln.startswith("data:")]
            return r, len(raw), events


def check_reply(r, sent_len: int, reply, stream: bool, mock, min_body: int, model_up: str):
    assert r.status_code == 200, f"{r.status_code}: {r.text[:500]}"
    if stream:
        chunks = chunks_of([(0.0, e) for e in reply])
        text = content_of_chunks(chunks)
    else:
        text = reply["choices"][0]["message"]["content"]
        usage = reply["usage"]
        assert usage["completion_tokens"] == TAIL_TOKENS, \
            f"the directive at the end of the body was not seen upstream: {usage}"
        # the mock's token estimate reflects a prompt of this size
        assert usage["prompt_tokens"] >= min_body // 10, usage
    assert text
    rec = mock.only_request("/v1/chat/completions")
    assert rec["model"] == model_up
    assert rec["messages_count"] == 2
    # non-streaming requests go upstream as streams too (assembled by the gateway)
    assert rec["stream"] is True
    # the forwarded body is the client's with the model rewritten (and stream_options or
    # a max_tokens cap possibly added): about the same size, never truncated
    assert rec["body_len"] >= min_body, rec
    assert sent_len - 1000 <= rec["body_len"] <= sent_len + 1000, (sent_len, rec)


@pytest.fixture(scope="module")
def gw(gateway):
    return gateway()


@pytest.mark.parametrize("transfer", ["content-length", "chunked"])
@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_300kb_prompt_reaches_upstream_intact(gw, mock, transfer, stream):
    r, sent, reply = send(gw, big_body(300 * KB, stream), transfer, stream)
    check_reply(r, sent, reply, stream, mock, 300_000, "gpt-4o-mini-2024-07-18")


@pytest.mark.parametrize("transfer", ["content-length", "chunked"])
@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_3mib_prompt_works(gw, mock, transfer, stream):
    r, sent, reply = send(gw, big_body(3 * MIB, stream), transfer, stream)
    check_reply(r, sent, reply, stream, mock, 3 * MIB, "gpt-4o-mini-2024-07-18")


def test_large_prompt_to_openai_compatible_provider(gw, mock):
    r, sent, reply = send(gw, big_body(300 * KB, False, model="llama-70b"), "content-length", False)
    check_reply(r, sent, reply, False, mock, 300_000, "llama-70b")
    assert mock.only_request()["path"] == "/inhouse/v1/chat/completions"


def test_streamed_large_prompt_usage_counts_the_tail_directive(gw, mock):
    body = big_body(300 * KB, True)
    body["stream_options"] = {"include_usage": True}
    r, sent, events = send(gw, body, "chunked", True)
    assert r.status_code == 200, r.text[:500]
    chunks = chunks_of([(0.0, e) for e in events])
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert len(usage) == 1
    assert usage[0]["completion_tokens"] == TAIL_TOKENS
    assert usage[0]["prompt_tokens"] >= 30_000


@pytest.fixture(scope="module")
def small_limit_gw(gateway):
    return gateway({"max_body_bytes": 1048576})


@pytest.mark.parametrize("transfer", ["content-length", "chunked"])
def test_body_over_max_body_bytes_is_413(small_limit_gw, mock, transfer):
    r, _, _ = send(small_limit_gw, big_body(1_500_000, False), transfer, False)
    assert_openai_error(r, 413, "request_too_large")
    assert mock.requests() == [], "an oversized request must not reach the upstream"


def test_body_under_max_body_bytes_passes(small_limit_gw, mock):
    r, sent, reply = send(small_limit_gw, big_body(900 * KB, False), "chunked", False)
    check_reply(r, sent, reply, False, mock, 900 * KB, "gpt-4o-mini-2024-07-18")


def test_default_limit_is_4mib(gw, mock):
    r, _, _ = send(gw, big_body(4 * MIB + 4096, False), "content-length", False)
    assert_openai_error(r, 413, "request_too_large")
