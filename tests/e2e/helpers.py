"""Small helpers shared by the e2e tests (raw HTTP, SSE, error-shape checks)."""

from __future__ import annotations

import json
import time
from typing import Any, Iterable, Iterator

import httpx

ACME = "sk-acme-test"
GLOBEX = "sk-globex-test"
SOLO = "sk-solo"

# No single request of this suite may take longer than this (seconds).
REQUEST_TIMEOUT = httpx.Timeout(10.0, connect=3.0)
MAX_ERROR_LATENCY_S = 5.0


def auth(key: str | None = ACME) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def chat_body(prompt: str = "Say hello.", model: str | None = "gpt-4o-mini", stream: bool = False,
              **extra: Any) -> dict:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "stream": stream}
    if model is not None:
        body["model"] = model
    body.update(extra)
    return body


def client(timeout: httpx.Timeout = REQUEST_TIMEOUT) -> httpx.Client:
    return httpx.Client(timeout=timeout)


def post_chat(gw, body: Any, key: str | None = ACME, headers: dict | None = None,
              timeout: httpx.Timeout = REQUEST_TIMEOUT) -> httpx.Response:
    """POST /v1/chat/completions; `body` may be a dict (sent as JSON), bytes/str (sent as is,
    with Content-Length) or an iterator of bytes (sent chunked)."""
    h = {"content-type": "application/json", **auth(key), **(headers or {})}
    kw: dict[str, Any] = {}
    if isinstance(body, dict):
        kw["content"] = json.dumps(body).encode()
    else:
        kw["content"] = body
    with httpx.Client(timeout=timeout) as c:
        return c.post(f"{gw.base_url}/v1/chat/completions", headers=h, **kw)


def sse_events(lines: Iterable[str]) -> Iterator[tuple[float, str]]:
    """(arrival time, data payload) for each `data:` line of an SSE stream."""
    for line in lines:
        if line.startswith("data:"):
            yield time.monotonic(), line[5:].strip()


def stream_chat(gw, body: dict, key: str | None = ACME, headers: dict | None = None,
                timeout: httpx.Timeout = REQUEST_TIMEOUT) -> tuple[httpx.Response, list[tuple[float, str]], float]:
    """Streams a chat completion with raw SSE; returns (response, [(t, data)], t_start)."""
    h = {"content-type": "application/json", **auth(key), **(headers or {})}
    events: list[tuple[float, str]] = []
    with httpx.Client(timeout=timeout) as c:
        t0 = time.monotonic()
        with c.stream("POST", f"{gw.base_url}/v1/chat/completions", headers=h,
                      content=json.dumps(body).encode()) as r:
            if r.status_code != 200:
                r.read()
                return r, events, t0
            events = list(sse_events(r.iter_lines()))
    return r, events, t0


def chunks_of(events: list[tuple[float, str]]) -> list[dict]:
    """The JSON chunks of a chat-completions stream, checking it ends with [DONE]."""
    assert events, "empty stream"
    assert events[-1][1] == "[DONE]", f"stream does not end with [DONE]: {events[-3:]}"
    out = []
    for _, data in events[:-1]:
        assert data != "[DONE]", "[DONE] before the end of the stream"
        out.append(json.loads(data))
    return out


def content_of_chunks(chunks: list[dict]) -> str:
    return "".join((ch.get("delta") or {}).get("content") or ""
                   for c in chunks for ch in c.get("choices") or [])


def assert_openai_error(r: httpx.Response, status: int, code: str | set[str]) -> dict:
    """The response is `status` with an OpenAI error body of exactly the contract's shape."""
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:500]}"
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "code", "param"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    codes = {code} if isinstance(code, str) else code
    assert err["code"] in codes, err
    assert err["param"] is None, err
    assert r.headers.get("x-request-id"), "error responses carry x-request-id too"
    return err


def header_pairs(record: dict) -> list[tuple[str, str]]:
    """(name, value) pairs of a mock request record's headers, whatever their JSON shape."""
    h = record.get("headers") or {}
    out: list[tuple[str, str]] = []
    if isinstance(h, dict):
        for k, v in h.items():
            for one in v if isinstance(v, list) else [v]:
                out.append((str(k).lower(), str(one)))
    else:
        for item in h:
            k, v = item if isinstance(item, (list, tuple)) else (item.get("name"), item.get("value"))
            out.append((str(k).lower(), str(v)))
    return out


def header_of(record: dict, name: str) -> str | None:
    vals = [v for k, v in header_pairs(record) if k == name.lower()]
    return vals[0] if vals else None
