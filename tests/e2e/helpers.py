"""Small helpers shared by the e2e tests (raw HTTP, SSE, error-shape checks)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
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


# --------------------------------------------------------------------------- Anthropic Messages


def new_request_id(prefix: str = "e2e") -> str:
    """A unique `x-request-id` (the gateway processes are shared by the whole session)."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def messages_body(prompt: str = "Say hello.", model: str | None = "claude-haiku", stream: bool = False,
                  max_tokens: int | None = 100, **extra: Any) -> dict:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "stream": stream}
    if model is not None:
        body["model"] = model
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update(extra)
    return body


def post_messages(gw, body: Any, key: str | None = ACME, headers: dict | None = None,
                  timeout: httpx.Timeout = REQUEST_TIMEOUT) -> httpx.Response:
    """POST /v1/messages (Anthropic format); `body` as for `post_chat`."""
    h = {"content-type": "application/json", "anthropic-version": "2023-06-01", **auth(key), **(headers or {})}
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    with httpx.Client(timeout=timeout) as c:
        return c.post(f"{gw.base_url}/v1/messages", headers=h, content=content)


def anthropic_sse(lines: Iterable[str]) -> list[tuple[str, Any]]:
    """(event name, parsed data) of each event of an Anthropic SSE stream; data that is not
    JSON is kept as the raw string."""
    out: list[tuple[str, Any]] = []
    name: str | None = None
    data: list[str] = []
    for line in list(lines) + [""]:
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and (name is not None or data):
            raw = "\n".join(data)
            try:
                parsed: Any = json.loads(raw)
            except ValueError:
                parsed = raw
            out.append((name or "", parsed))
            name, data = None, []
    return out


def stream_messages(gw, body: dict, key: str | None = ACME, headers: dict | None = None,
                    timeout: httpx.Timeout = REQUEST_TIMEOUT) -> tuple[httpx.Response, list[tuple[str, Any]]]:
    """Streams POST /v1/messages with raw SSE; returns (response, [(event, data)])."""
    h = {"content-type": "application/json", "anthropic-version": "2023-06-01", **auth(key), **(headers or {})}
    with httpx.Client(timeout=timeout) as c:
        with c.stream("POST", f"{gw.base_url}/v1/messages", headers=h, content=json.dumps(body).encode()) as r:
            if r.status_code != 200:
                r.read()
                return r, []
            events = anthropic_sse(r.iter_lines())
    return r, events


def text_of_anthropic_events(events: list[tuple[str, Any]]) -> str:
    return "".join(d["delta"].get("text") or "" for n, d in events
                   if n == "content_block_delta" and isinstance(d, dict) and d.get("delta", {}).get("type") == "text_delta")


def assert_anthropic_error(r: httpx.Response, status: int, error_type: str | set[str] | None = None) -> dict:
    """The response is `status` with an Anthropic error body of the contract's shape:
    `{"type":"error","error":{"type":..., "message":...}}`."""
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:500]}"
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body, dict) and set(body) == {"type", "error"} and body["type"] == "error", body
    err = body["error"]
    assert isinstance(err, dict) and set(err) == {"type", "message"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if error_type is not None:
        types = {error_type} if isinstance(error_type, str) else error_type
        assert err["type"] in types, err
    assert r.headers.get("x-request-id"), "error responses carry x-request-id too"
    return err


# --------------------------------------------------------------------------- audit spool


def spool_dir(gw) -> Path:
    """The gateway's `audit.spool_dir` (relative paths are relative to its config's dir)."""
    d = Path(gw.config["audit"]["spool_dir"])
    return d if d.is_absolute() else Path(gw.config_path).parent / d


def read_audit(gw) -> list[dict]:
    """Every audit row currently in the gateway's spool files (`audit-YYYYMMDDHH.jsonl`),
    oldest file first; a partly written last line is skipped."""
    rows: list[dict] = []
    for f in sorted(spool_dir(gw).glob("audit-*.jsonl")):
        try:
            text = f.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def audit_rows(gw, request_id: str | None = None, timeout: float = 5.0) -> list[dict]:
    """Audit rows of the gateway's spool. With `request_id`, polls the spool until at least
    one row with that id is there (fails after `timeout` s) and returns those rows; without,
    returns every row present now."""
    if request_id is None:
        return read_audit(gw)
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in read_audit(gw) if r.get("request_id") == request_id]
        if rows:
            return rows
        if time.monotonic() >= deadline:
            raise AssertionError(f"no audit row with request_id {request_id!r} in {spool_dir(gw)} "
                                 f"within {timeout}s")
        time.sleep(0.02)


def cost_nanousd(price: dict, tokens_in: int, tokens_out: int, cached_in: int = 0) -> int:
    """The contract's cost formula on a model's `price` from the config (USD per million
    tokens): integer nano-USD, rounded up. Cached input defaults to the input price."""
    def nano_per_mtok(usd: float) -> int:
        return round(usd * 1_000_000_000)

    p_in = nano_per_mtok(price["input_per_mtok"])
    p_out = nano_per_mtok(price["output_per_mtok"])
    p_cached = nano_per_mtok(price.get("cached_input_per_mtok", price["input_per_mtok"]))
    cached = min(cached_in, tokens_in)
    total = (tokens_in - cached) * p_in + cached * p_cached + tokens_out * p_out
    return -(-total // 1_000_000)


def keep_circuit_closed(gw, model: str, n: int = 2) -> None:
    """Sends `n` successful one-token requests to `model`, so the failures a test is about to
    inject cannot add up, with earlier tests' failures, to the gateway's circuit-breaker
    thresholds (5 consecutive failures among mostly failing recent calls, or >= 50% of >= 20
    calls in 10 s, per provider).
    Call it before a test that makes a provider fail, then reset the mock's request log."""
    for _ in range(n):
        r = post_chat(gw, chat_body("warm-up [[mock: tokens=1]]", model=model))
        assert r.status_code == 200, f"warm-up request to {model} failed: {r.status_code} {r.text[:300]}"
