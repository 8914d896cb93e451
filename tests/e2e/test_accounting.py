"""Exact token and cost accounting, checked on the audit rows the gateway writes to its
spool (no ClickHouse in the test config): every (endpoint x provider kind) pair, streamed
and not, with and without provider usage, cut and abandoned streams, rejected and failed
requests."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from helpers import (ACME, REQUEST_TIMEOUT, assert_anthropic_error, assert_openai_error, audit_rows, auth, chat_body,
                     chunks_of, content_of_chunks, cost_nanousd, keep_circuit_closed, messages_body, new_request_id,
                     post_chat, post_messages, stream_chat, stream_messages, text_of_anthropic_events)

ENDPOINTS = ["chat_completions", "messages"]
MODELS = {
    # public model -> provider name in the test config
    "gpt-4o-mini": "openai",
    "claude-haiku": "anthropic",
    "llama-70b": "inhouse",
}
PAIRS = [(e, m) for e in ENDPOINTS for m in MODELS]
PAIR_IDS = [f"{e}-{m}" for e, m in PAIRS]
ROW_COLUMNS = {
    "request_id", "ts", "ts_ms", "tenant", "api_key_id", "endpoint", "model_requested", "model", "provider",
    "region", "stream", "status", "error_code", "tokens_in", "tokens_out", "cached_tokens_in", "usage_estimated",
    "cost_nanousd", "latency_ms", "ttft_ms", "cache_hit", "fallback_used", "attempts", "node", "end_user",
    "upstream_model",
}


@pytest.fixture(scope="module")
def gw(gateway):
    return gateway()


# Streams cut and providers failed on purpose count against the circuit breakers; those
# tests run on a gateway process of their own (same config as test_anthropic.py's fault
# gateway) and keep each circuit closed with successful calls first.
FAULT_GATEWAY = {"node": {"region": "us-east-1"}}


@pytest.fixture(scope="module")
def fault_gw(gateway):
    return gateway(FAULT_GATEWAY)


@pytest.fixture(scope="module")
def small_limit_gw(gateway):
    # same overrides as test_large_bodies.py, so the process is shared
    return gateway({"max_body_bytes": 1048576})


def price_of(gw, model: str) -> dict:
    return gw.config["models"][model]["price"]


def send(gw, endpoint: str, prompt: str, model: str, stream: bool, rid: str, key: str | None = ACME,
         **extra) -> httpx.Response | tuple:
    """One request with `x-request-id: rid`: non-stream -> the response; stream -> (response,
    events) with events as `stream_chat` / `stream_messages` return them."""
    h = {"x-request-id": rid}
    if endpoint == "chat_completions":
        body = chat_body(prompt, model=model, stream=stream, **extra)
        return stream_chat(gw, body, key=key, headers=h)[:2] if stream else post_chat(gw, body, key=key, headers=h)
    body = messages_body(prompt, model=model, stream=stream, **extra)
    return stream_messages(gw, body, key=key, headers=h) if stream else post_messages(gw, body, key=key, headers=h)


def usage_non_stream(endpoint: str, r: httpx.Response) -> tuple[int, int, int]:
    """(input, output, cached input) the client saw in a non-streamed response."""
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    if endpoint == "chat_completions":
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return u["prompt_tokens"], u["completion_tokens"], cached
    return (u["input_tokens"] + (u.get("cache_read_input_tokens") or 0), u["output_tokens"],
            u.get("cache_read_input_tokens") or 0)


def usage_of_chat_stream(events) -> tuple[int, int, int]:
    chunks = chunks_of(events)
    with_usage = [c for c in chunks if c.get("usage")]
    assert len(with_usage) == 1, f"expected one usage chunk: {chunks[-2:]}"
    u = with_usage[0]["usage"]
    return u["prompt_tokens"], u["completion_tokens"], (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def usage_of_messages_stream(events) -> tuple[int, int, int]:
    """Anthropic stream usage as a client reads it: message_start's usage, updated by the
    fields message_delta carries (output_tokens always, input_tokens when present)."""
    names = [n for n, _ in events]
    assert names and names[0] == "message_start" and names[-1] == "message_stop", names
    u = dict(events[0][1]["message"].get("usage") or {})
    deltas = [d for n, d in events if n == "message_delta"]
    assert len(deltas) == 1, names
    u.update({k: v for k, v in (deltas[0].get("usage") or {}).items() if v is not None})
    cached = u.get("cache_read_input_tokens") or 0
    return u["input_tokens"] + cached, u["output_tokens"], cached


def check_row_common(row: dict, *, rid: str, endpoint: str, model: str, stream: bool, status: int) -> None:
    assert set(row) == ROW_COLUMNS, f"columns differ from the contract: {set(row) ^ ROW_COLUMNS}"
    assert row["request_id"] == rid
    assert row["endpoint"] == endpoint, row
    assert row["stream"] == int(stream), row
    assert row["status"] == status, row
    assert row["model_requested"] == model, row
    assert isinstance(row["ts_ms"], int) and abs(row["ts_ms"] / 1000 - time.time()) < 120, row
    assert row["node"], row


def check_served_row(row: dict, gw, *, rid: str, endpoint: str, model: str, stream: bool) -> None:
    check_row_common(row, rid=rid, endpoint=endpoint, model=model, stream=stream, status=200)
    assert row["tenant"] == "acme" and row["api_key_id"] == "acme-test", row
    assert row["model"] == model and row["provider"] == MODELS[model], row
    assert row["region"] == "us-east-1", row
    assert row["error_code"] == "", row
    assert row["cache_hit"] == 0 and row["fallback_used"] == 0 and row["attempts"] == 1, row


def assert_cost_consistent(gw, row: dict, model: str) -> None:
    want = cost_nanousd(price_of(gw, model), row["tokens_in"], row["tokens_out"], row["cached_tokens_in"])
    assert row["cost_nanousd"] == want, (
        f"cost {row['cost_nanousd']} != price x tokens {want} for {model} "
        f"(in={row['tokens_in']} out={row['tokens_out']} cached={row['cached_tokens_in']})")


def one_row(gw, rid: str) -> dict:
    """The single audit row of `rid`. A second row could land a moment after the first, so
    after the first appears a marker request is sent and its row awaited: rows are written in
    order, so once the marker's row is there every row of `rid` is too."""
    audit_rows(gw, rid)
    marker = new_request_id("marker")
    r = post_chat(gw, chat_body("marker [[mock: tokens=1]]"), headers={"x-request-id": marker})
    assert r.status_code == 200, r.text
    audit_rows(gw, marker)
    rows = audit_rows(gw, rid)
    assert len(rows) == 1, f"expected exactly one audit row for {rid}, got {len(rows)}: {rows}"
    return rows[0]


# --------------------------------------------------------------------------- exact usage, every pair


@pytest.mark.parametrize(("endpoint", "model"), PAIRS, ids=PAIR_IDS)
def test_non_stream_row_equals_client_usage_and_cost(gw, mock, endpoint, model):
    rid = new_request_id("acct-ns")
    r = send(gw, endpoint, f"Count me {endpoint} {model}. [[mock: tokens=7]]", model, False, rid)
    tin, tout, cached = usage_non_stream(endpoint, r)
    assert tout == 7 and tin > 0
    row = one_row(gw, rid)
    check_served_row(row, gw, rid=rid, endpoint=endpoint, model=model, stream=False)
    assert (row["tokens_in"], row["tokens_out"], row["cached_tokens_in"]) == (tin, tout, cached), row
    assert row["usage_estimated"] == 0, row
    assert row["cost_nanousd"] == cost_nanousd(price_of(gw, model), tin, tout, cached) > 0, row


@pytest.mark.parametrize(("endpoint", "model"), PAIRS, ids=PAIR_IDS)
def test_stream_row_equals_client_usage_and_cost(gw, mock, endpoint, model):
    prompt = f"Stream count {endpoint} {model}. [[mock: tokens=7]]"
    # the same prompt non-streamed: the mock's usage depends on the prompt text only
    ref = usage_non_stream(endpoint, send(gw, endpoint, prompt, model, False, new_request_id("acct-ref")))
    rid = new_request_id("acct-s")
    if endpoint == "chat_completions":
        r, events = send(gw, endpoint, prompt, model, True, rid, stream_options={"include_usage": True})
        assert r.status_code == 200, r.text
        seen = usage_of_chat_stream(events)
        assert len(content_of_chunks(chunks_of(events)).split()) == 7
    else:
        r, events = send(gw, endpoint, prompt, model, True, rid)
        assert r.status_code == 200, r.text
        seen = usage_of_messages_stream(events)
        assert len(text_of_anthropic_events(events).split()) == 7
    assert seen == ref, f"stream usage {seen} != non-stream usage {ref}"
    row = one_row(gw, rid)
    check_served_row(row, gw, rid=rid, endpoint=endpoint, model=model, stream=True)
    assert (row["tokens_in"], row["tokens_out"], row["cached_tokens_in"]) == seen, row
    assert row["usage_estimated"] == 0, row
    assert row["cost_nanousd"] == cost_nanousd(price_of(gw, model), *seen[:2], seen[2]) > 0, row
    assert row["ttft_ms"] <= row["latency_ms"], row


@pytest.mark.parametrize("model", list(MODELS))
def test_chat_stream_without_include_usage_is_still_billed_exactly(gw, mock, model):
    prompt = f"No usage asked {model}. [[mock: tokens=5]]"
    ref = usage_non_stream("chat_completions", send(gw, "chat_completions", prompt, model, False,
                                                    new_request_id("acct-ref")))
    rid = new_request_id("acct-nou")
    r, events = send(gw, "chat_completions", prompt, model, True, rid)
    assert r.status_code == 200, r.text
    chunks = chunks_of(events)
    assert all("usage" not in c or c["usage"] is None for c in chunks), "usage the client did not ask for"
    row = one_row(gw, rid)
    check_served_row(row, gw, rid=rid, endpoint="chat_completions", model=model, stream=True)
    assert row["tokens_out"] > 0, "a stream without client-requested usage billed at 0 tokens"
    assert row["usage_estimated"] == 0, "the gateway must get real usage from the provider"
    assert (row["tokens_in"], row["tokens_out"], row["cached_tokens_in"]) == ref, row
    assert row["cost_nanousd"] == cost_nanousd(price_of(gw, model), *ref[:2], ref[2]) > 0, row


# --------------------------------------------------------------------------- estimated usage


@pytest.mark.parametrize(("endpoint", "model"), PAIRS, ids=PAIR_IDS)
def test_stream_without_provider_usage_is_estimated_never_free(gw, mock, endpoint, model):
    rid = new_request_id("acct-nousage")
    r, events = send(gw, endpoint, f"Usage none {endpoint} {model}. [[mock: usage=none; tokens=6]]", model, True, rid)
    assert r.status_code == 200, r.text
    row = one_row(gw, rid)
    check_row_common(row, rid=rid, endpoint=endpoint, model=model, stream=True, status=200)
    assert row["usage_estimated"] == 1, row
    assert row["tokens_in"] > 0 and row["tokens_out"] > 0, row
    assert row["cost_nanousd"] > 0, row
    assert_cost_consistent(gw, row, model)


@pytest.mark.parametrize(("endpoint", "model"), PAIRS, ids=PAIR_IDS)
def test_cut_stream_is_estimated_never_free(fault_gw, mock, endpoint, model):
    gw = fault_gw
    keep_circuit_closed(gw, model)
    rid = new_request_id("acct-cut")
    prompt = f"Cut {endpoint} {model}. [[mock: fault=cut; cut_after=4; tokens=12; gap_ms=20]]"
    r, _ = send(gw, endpoint, prompt, model, True, rid)
    assert r.status_code == 200, r.text
    row = one_row(gw, rid)
    check_row_common(row, rid=rid, endpoint=endpoint, model=model, stream=True, status=200)
    assert row["usage_estimated"] == 1, row
    assert row["tokens_in"] > 0 and row["tokens_out"] > 0, row
    assert row["cost_nanousd"] > 0, row
    assert_cost_consistent(gw, row, model)


@pytest.mark.parametrize(("endpoint", "model"), PAIRS, ids=PAIR_IDS)
def test_client_disconnect_mid_stream_is_billed_and_upstream_cancelled(fault_gw, mock, endpoint, model):
    """The client leaves after a few tokens of a stream that would take 6 s: the row (written
    when the gateway is done with the call) appears well before the upstream would have
    finished, and bills what was produced."""
    gw = fault_gw
    keep_circuit_closed(gw, model)
    rid = new_request_id("acct-gone")
    prompt = f"Long {endpoint} {model}. [[mock: tokens=200; gap_ms=30]]"
    h = {"content-type": "application/json", **auth(ACME), "x-request-id": rid}
    if endpoint == "chat_completions":
        url, body = "/v1/chat/completions", chat_body(prompt, model=model, stream=True)
    else:
        url, body = "/v1/messages", messages_body(prompt, model=model, stream=True, max_tokens=1000)
        h["anthropic-version"] = "2023-06-01"
    seen = 0
    with httpx.Client(timeout=REQUEST_TIMEOUT) as c:
        with c.stream("POST", gw.base_url + url, headers=h, content=json.dumps(body).encode()) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:") and ("content" in line or "text_delta" in line):
                    seen += 1
                if seen >= 4:
                    break
    t_left = time.monotonic()
    rows = audit_rows(gw, rid, timeout=3.0)
    assert time.monotonic() - t_left < 3.0
    assert len(rows) == 1, rows
    row = rows[0]
    check_row_common(row, rid=rid, endpoint=endpoint, model=model, stream=True, status=200)
    assert row["tokens_out"] > 0 and row["tokens_in"] > 0, row
    assert row["tokens_out"] < 200, "billed for tokens the upstream never produced"
    assert row["cost_nanousd"] > 0, row
    assert_cost_consistent(gw, row, model)


# --------------------------------------------------------------------------- rejected and failed requests


def _post_raw(gw, endpoint: str, body, key: str | None = ACME, rid: str = "") -> httpx.Response:
    h = {"x-request-id": rid}
    return (post_chat if endpoint == "chat_completions" else post_messages)(gw, body, key=key, headers=h)


def _assert_error_format(endpoint: str, r: httpx.Response, status: int, code: str) -> None:
    if endpoint == "chat_completions":
        assert_openai_error(r, status, code)
    else:
        assert_anthropic_error(r, status)


def _body(endpoint: str, prompt: str, model: str | None = "gpt-4o-mini", stream: bool = False) -> dict:
    return (chat_body if endpoint == "chat_completions" else messages_body)(prompt, model=model, stream=stream)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_rejected_401_has_one_row_with_no_cost(gw, mock, endpoint):
    rid = new_request_id("acct-401")
    r = _post_raw(gw, endpoint, _body(endpoint, "hi"), key="sk-not-a-tenant", rid=rid)
    _assert_error_format(endpoint, r, 401, "invalid_api_key")
    row = one_row(gw, rid)
    assert row["status"] == 401 and row["error_code"] == "invalid_api_key", row
    assert row["endpoint"] == endpoint and row["tenant"] == "", row
    assert row["cost_nanousd"] == 0 and row["tokens_out"] == 0, row
    assert row["provider"] == "", row


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_rejected_unknown_model_has_one_row_with_no_cost(gw, mock, endpoint):
    rid = new_request_id("acct-400")
    r = _post_raw(gw, endpoint, _body(endpoint, "hi", model="no-such-model"), rid=rid)
    _assert_error_format(endpoint, r, 400, "model_not_found")
    upstream = mock.requests()
    row = one_row(gw, rid)
    assert row["status"] == 400 and row["error_code"] == "model_not_found", row
    assert row["endpoint"] == endpoint and row["tenant"] == "acme", row
    assert row["model_requested"] == "no-such-model", row
    assert row["cost_nanousd"] == 0 and row["tokens_out"] == 0 and row["provider"] == "", row
    assert upstream == []


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_rejected_413_has_one_row_with_no_cost(small_limit_gw, mock, endpoint):
    rid = new_request_id("acct-413")
    r = _post_raw(small_limit_gw, endpoint, _body(endpoint, "x" * 1_200_000), rid=rid)
    _assert_error_format(endpoint, r, 413, "request_too_large")
    upstream = mock.requests()
    row = one_row(small_limit_gw, rid)
    assert row["status"] == 413 and row["error_code"] == "request_too_large", row
    assert row["endpoint"] == endpoint, row
    assert row["cost_nanousd"] == 0 and row["tokens_out"] == 0 and row["provider"] == "", row
    assert upstream == []


@pytest.mark.parametrize(("endpoint", "model"), PAIRS, ids=PAIR_IDS)
def test_upstream_503_row_has_attempts_and_no_cost(fault_gw, mock, endpoint, model):
    gw = fault_gw
    keep_circuit_closed(gw, model)
    mock.reset()
    rid = new_request_id("acct-503")
    r = _post_raw(gw, endpoint, _body(endpoint, "Down. [[mock: status=503]]", model=model), rid=rid)
    _assert_error_format(endpoint, r, 503, "upstream_unavailable")
    upstream = mock.requests()
    row = one_row(gw, rid)
    assert row["status"] == 503 and row["error_code"] == "upstream_unavailable", row
    assert row["attempts"] >= 1, row
    assert row["attempts"] == int(r.headers["x-gateway-attempts"]), (row, dict(r.headers))
    assert row["attempts"] == len(upstream), "attempts = upstream requests made"
    assert row["cost_nanousd"] == 0 and row["tokens_out"] == 0, row
    assert row["model_requested"] == model and row["endpoint"] == endpoint, row


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize(("endpoint", "model"), PAIRS, ids=PAIR_IDS)
def test_upstream_400_row_has_status_code_and_no_cost(fault_gw, mock, endpoint, model, stream):
    """A provider's 400 is the client's 400: the row has that status, the contract's
    `invalid_request` code and no cost."""
    gw = fault_gw
    rid = new_request_id("acct-up400")
    body = _body(endpoint, "Refused. [[mock: status=400]]", model=model, stream=stream)
    h = {"content-type": "application/json", **auth(ACME), "x-request-id": rid, "anthropic-version": "2023-06-01"}
    url = "/v1/chat/completions" if endpoint == "chat_completions" else "/v1/messages"
    r = None
    try:
        with httpx.Client(timeout=httpx.Timeout(5.0, connect=3.0)) as c:
            r = c.post(gw.base_url + url, headers=h, content=json.dumps(body).encode())
    except httpx.HTTPError:
        pass  # a broken error body is test_anthropic.py's business; the row is checked here
    row = one_row(gw, rid)
    assert row["status"] == 400, row
    if r is not None:
        assert r.status_code == row["status"], "the row's status is the one sent to the client"
    assert row["cost_nanousd"] == 0 and row["tokens_out"] == 0, row
    assert row["provider"] == MODELS[model] and row["attempts"] == 1, row
    # the contract's code for a 400 caused by the request's content, whichever format the
    # body the client got is in (a same-format provider body is passed through as is)
    assert row["error_code"] == "invalid_request", row
