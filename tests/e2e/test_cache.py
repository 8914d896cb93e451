"""The response cache (issue 6): hit/miss/bypass rules, the key, tenant isolation, the
cache lock under concurrency, streams replayed through the official SDKs, what is never
stored, purge, the audit row of a hit and the memory bound -- all through the real
binary and the mock provider, counting upstream calls in the mock's request log."""
from __future__ import annotations

import json
import random
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from anthropic import Anthropic
from openai import OpenAI

from conftest import ADMIN_TOKEN, sha256_hex
from helpers import (ACME, audit_rows, keep_circuit_closed, chat_body, messages_body, new_request_id, post_chat,
                     post_messages, stream_chat)

CACHE_A = "sk-cache-a"
CACHE_B = "sk-cache-b"
NOCACHE = "sk-cache-off"


def tenant(key_id: str, key: str, enabled: bool = True, **extra) -> dict:
    return {"api_keys": [{"id": key_id, "sha256": sha256_hex(key)}],
            "models": ["gpt-4o-mini", "claude-haiku", "llama-70b"],
            "cache": {"enabled": enabled, "ttl_s": 600}, **extra}


OVERRIDES = {"tenants": {
    "cache-a": tenant("cache-a-key", CACHE_A),
    "cache-b": tenant("cache-b-key", CACHE_B),
    "cache-off": tenant("cache-off-key", NOCACHE, enabled=False),
}}


@pytest.fixture(scope="module")
def gw(gateway):
    return gateway(OVERRIDES)


def unique(prompt: str = "cache me") -> str:
    """A prompt no other test sent, so its first request is a miss."""
    return f"{prompt} {uuid.uuid4().hex} [[mock: tokens=8]]"


def body(prompt: str, **extra) -> dict:
    return chat_body(prompt, temperature=0, **extra)


def upstream_calls(mock) -> int:
    return len([q for q in mock.requests() if str(q.get("path", "")).endswith(("/chat/completions", "/messages"))])


def admin(gw, method: str, path: str) -> httpx.Response:
    return httpx.request(method, gw.admin_url + path, headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                         timeout=5)


# --------------------------------------------------------------------------- hit / miss / bypass


def test_second_identical_request_is_a_hit_with_the_same_answer(gw, mock):
    b = body(unique())
    first = post_chat(gw, b, key=CACHE_A)
    assert first.status_code == 200, first.text
    assert first.headers["x-gateway-cache"] == "miss"
    second = post_chat(gw, b, key=CACHE_A)
    assert second.status_code == 200, second.text
    assert second.headers["x-gateway-cache"] == "hit"
    assert second.json() == first.json()
    assert second.headers["x-gateway-model"] == "gpt-4o-mini"
    assert upstream_calls(mock) == 1


@pytest.mark.parametrize("extra, why", [
    ({}, "temperature absent: the provider default samples"),
    ({"temperature": 0.7}, "sampled"),
    ({"temperature": 0, "n": 2}, "several choices"),
])
def test_non_deterministic_requests_bypass(gw, mock, extra, why):
    b = chat_body(unique(), **extra)
    for _ in range(2):
        r = post_chat(gw, b, key=CACHE_A)
        assert r.status_code == 200, r.text
        assert r.headers["x-gateway-cache"] == "bypass", why
    assert upstream_calls(mock) == 2, why


def test_tenant_with_cache_disabled_bypasses(gw, mock):
    b = body(unique())
    for _ in range(2):
        r = post_chat(gw, b, key=NOCACHE)
        assert r.headers["x-gateway-cache"] == "bypass"
    assert upstream_calls(mock) == 2


def test_no_store_neither_reads_nor_writes(gw, mock):
    b = body(unique())
    r = post_chat(gw, b, key=CACHE_A, headers={"cache-control": "no-store"})
    assert r.headers["x-gateway-cache"] == "bypass"
    assert post_chat(gw, b, key=CACHE_A).headers["x-gateway-cache"] == "miss", "no-store wrote the entry"
    assert post_chat(gw, b, key=CACHE_A).headers["x-gateway-cache"] == "hit"
    r = post_chat(gw, b, key=CACHE_A, headers={"cache-control": "no-store"})
    assert r.headers["x-gateway-cache"] == "bypass", "no-store read the entry"
    assert upstream_calls(mock) == 3


def test_no_cache_refreshes_the_entry(gw, mock):
    b = body(unique())
    first = post_chat(gw, b, key=CACHE_A)
    assert first.headers["x-gateway-cache"] == "miss"
    refreshed = post_chat(gw, b, key=CACHE_A, headers={"cache-control": "no-cache"})
    assert refreshed.headers["x-gateway-cache"] == "miss"
    assert upstream_calls(mock) == 2, "no-cache must not read the cache"
    after = post_chat(gw, b, key=CACHE_A)
    assert after.headers["x-gateway-cache"] == "hit"
    assert after.json() == refreshed.json(), "the refreshed answer is the one stored"
    assert after.json()["id"] != first.json()["id"]
    assert upstream_calls(mock) == 2


def test_json_spelling_does_not_change_the_key(gw, mock):
    p = unique()
    a = json.dumps({"model": "gpt-4o-mini", "temperature": 0, "max_tokens": 50, "top_p": 1,
                    "messages": [{"role": "user", "content": p}]})
    b = ('{ "messages": [ {"content": ' + json.dumps(p) + ', "role": "user"} ],\n'
         '  "max_tokens": 50, "top_p": 1.0, "temperature": 0.0, "model": "gpt-4o-mini" }')
    assert post_chat(gw, a, key=CACHE_A).headers["x-gateway-cache"] == "miss"
    assert post_chat(gw, b, key=CACHE_A).headers["x-gateway-cache"] == "hit"


KEY_PARAMS = [
    ("top_p", 0.5), ("max_tokens", 33), ("stop", ["zz"]), ("seed", 7),
    ("tools", [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]),
    ("tool_choice", "none"), ("response_format", {"type": "json_object"}),
    ("presence_penalty", 0.5), ("frequency_penalty", 0.5), ("user", "someone"),
]


def test_each_parameter_is_in_the_key(gw, mock):
    p = unique()
    base = body(p)
    assert post_chat(gw, base, key=CACHE_A).headers["x-gateway-cache"] == "miss"
    assert post_chat(gw, base, key=CACHE_A).headers["x-gateway-cache"] == "hit"
    variants = [dict(base, **{k: v}) for k, v in KEY_PARAMS]
    variants += [
        dict(base, model="llama-70b"),
        dict(base, stream=False, messages=[{"role": "system", "content": "be terse"}] + base["messages"]),
        dict(base, messages=[{"role": "user", "content": p + "!"}]),
    ]
    for v in variants:
        r = post_chat(gw, v, key=CACHE_A)
        assert r.status_code == 200, (v, r.text)
        changed = {k: v[k] for k in v if v[k] != base.get(k)}
        assert r.headers["x-gateway-cache"] == "miss", f"changing {changed} must miss"


# --------------------------------------------------------------------------- isolation


def test_property_random_bodies_never_hit_across_tenants(gw, mock):
    rng = random.Random(6)
    words = ["alpha", "tenant", "cache-a", "cache-b", "secret", "x"]
    for i in range(12):
        extra = {}
        for k, choices in [("max_tokens", [5, 9, None]), ("top_p", [1, 0.5, None]), ("seed", [1, 2, None]),
                           ("stop", [["q"], None]), ("user", ["cache-b", "cache-a", None])]:
            v = rng.choice(choices)
            if v is not None:
                extra[k] = v
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))
        b = body(f"{prompt} {i} {uuid.uuid4().hex[:6]}", **extra)
        first, second = (CACHE_A, CACHE_B) if rng.random() < 0.5 else (CACHE_B, CACHE_A)
        assert post_chat(gw, b, key=first).headers["x-gateway-cache"] == "miss"
        assert post_chat(gw, b, key=first).headers["x-gateway-cache"] == "hit"
        r = post_chat(gw, b, key=second)
        assert r.status_code == 200
        assert r.headers["x-gateway-cache"] == "miss", f"cross-tenant hit for {b}"


# --------------------------------------------------------------------------- concurrency


def test_twenty_concurrent_identical_requests_make_one_upstream_call(gw, mock):
    b = body(unique("herd") + " [[mock: ttft_ms=300; gap_ms=20; tokens=12]]", stream=True)

    def one(_):
        return stream_chat(gw, b, key=CACHE_A)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    texts = set()
    for r, events, _ in results:
        assert r.status_code == 200
        assert events[-1][1] == "[DONE]"
        texts.add("".join(e[1] for e in events))
    assert len(texts) == 1, "every request got the same stream"
    assert upstream_calls(mock) == 1
    kinds = sorted(r.headers["x-gateway-cache"] for r, _, _ in results)
    assert kinds.count("miss") == 1 and kinds.count("hit") == 19, kinds


# --------------------------------------------------------------------------- streams through the SDKs


def test_cached_chat_stream_read_through_openai_sdk_equals_the_original(gw, mock):
    c = OpenAI(base_url=gw.base_url + "/v1", api_key=CACHE_A, max_retries=0, timeout=15)
    kw = dict(model="gpt-4o-mini", temperature=0, stream=True, stream_options={"include_usage": True},
              messages=[{"role": "user", "content": unique("sdk stream")}])
    original = [ch.model_dump() for ch in c.chat.completions.create(**kw)]
    raw = c.chat.completions.with_raw_response.create(**kw)
    assert raw.headers["x-gateway-cache"] == "hit"
    replayed = [ch.model_dump() for ch in raw.parse()]
    assert replayed == original
    assert original[-1]["usage"]["completion_tokens"] == 8
    assert upstream_calls(mock) == 1


def test_cached_messages_stream_read_through_anthropic_sdk_equals_the_original(gw, mock):
    c = Anthropic(base_url=gw.base_url, api_key=CACHE_A, max_retries=0, timeout=15)
    kw = dict(model="claude-haiku", max_tokens=64, extra_body={"temperature": 0}, stream=True,
              messages=[{"role": "user", "content": unique("anthropic stream")}])
    original = [e.model_dump() for e in c.messages.create(**kw)]
    raw = c.messages.with_raw_response.create(**kw)
    assert raw.headers["x-gateway-cache"] == "hit"
    replayed = [e.model_dump() for e in raw.parse()]
    assert replayed == original
    assert [e["type"] for e in original][-1] == "message_stop"
    assert upstream_calls(mock) == 1


def test_translated_answer_is_replayed_in_the_clients_format(gw, mock):
    # /v1/messages answered by an OpenAI model: stored translated, replayed as is.
    b = messages_body(unique("translated"), model="gpt-4o-mini", temperature=0)
    first = post_messages(gw, b, key=CACHE_A)
    second = post_messages(gw, b, key=CACHE_A)
    assert first.status_code == second.status_code == 200
    assert second.headers["x-gateway-cache"] == "hit"
    assert second.json() == first.json() and second.json()["type"] == "message"
    # The same prompt on the other endpoint is another key (another wire format).
    r = post_chat(gw, body(b["messages"][0]["content"], max_tokens=100), key=CACHE_A)
    assert r.headers["x-gateway-cache"] == "miss"
    assert "choices" in r.json()


# --------------------------------------------------------------------------- never stored


@pytest.mark.parametrize("directive, stream", [
    ("status=500", False),
    ("status=400", False),
    ("fault=cut; cut_after=3", True),
    ("fault=midstream_error; cut_after=3", True),
    ("fault=garbage", False),
])
def test_errors_and_cut_streams_are_not_stored(gw, mock, directive, stream):
    # A single-model chain, so that the failure reaches the client.
    keep_circuit_closed(gw, "llama-70b", n=3)
    mock.reset()
    b = body(unique("broken") + f" [[mock: {directive}]]", stream=stream, model="llama-70b")
    for _ in range(2):
        if stream:
            r, events, _ = stream_chat(gw, b, key=CACHE_A)
            assert r.headers.get("x-gateway-cache") != "hit"
        else:
            r = post_chat(gw, b, key=CACHE_A)
            assert r.headers.get("x-gateway-cache") != "hit", r.text
    assert upstream_calls(mock) == 2, "the failed answer must not be served from cache"


def test_total_timeout_is_not_stored(gateway, mock):
    gw = gateway(dict(OVERRIDES, providers={"inhouse": {"timeouts": {
        "connect_ms": 2000, "first_token_ms": 5000, "idle_ms": 5000, "total_ms": 800}}}))
    b = body(unique("slow") + " [[mock: tokens=40; gap_ms=50]]", stream=True, model="llama-70b")
    r, events, _ = stream_chat(gw, b, key=CACHE_A)
    assert r.status_code == 200
    assert events[-1][1] != "[DONE]", "the stream should have been cut by total_ms"
    r2, _, _ = stream_chat(gw, b, key=CACHE_A)
    assert r2.headers["x-gateway-cache"] == "miss"
    assert upstream_calls(mock) == 2


# --------------------------------------------------------------------------- purge, audit, limits


def test_purge_drops_that_tenants_entries_only(gw, mock):
    a, b = body(unique("purge-a")), body(unique("purge-b"))
    post_chat(gw, a, key=CACHE_A)
    post_chat(gw, b, key=CACHE_B)
    r = admin(gw, "POST", "/admin/v1/tenants/cache-a/cache/purge")
    assert r.status_code == 200, r.text
    assert r.json()["purged"] >= 1
    assert post_chat(gw, a, key=CACHE_A).headers["x-gateway-cache"] == "miss"
    assert post_chat(gw, b, key=CACHE_B).headers["x-gateway-cache"] == "hit"
    assert admin(gw, "POST", "/admin/v1/tenants/nobody/cache/purge").status_code == 404
    assert httpx.post(gw.admin_url + "/admin/v1/tenants/cache-a/cache/purge", timeout=5).status_code == 401


def test_hit_audit_row_has_original_usage_and_no_cost(gw, mock):
    b = body(unique("audit"))
    miss_id, hit_id = new_request_id("cache-miss"), new_request_id("cache-hit")
    assert post_chat(gw, b, key=CACHE_A, headers={"x-request-id": miss_id}).status_code == 200
    r = post_chat(gw, b, key=CACHE_A, headers={"x-request-id": hit_id})
    assert r.headers["x-gateway-cache"] == "hit"
    miss, hit = audit_rows(gw, miss_id)[0], audit_rows(gw, hit_id)[0]
    assert miss["cache_hit"] == 0 and miss["cost_nanousd"] > 0
    assert hit["cache_hit"] == 1
    assert hit["cost_nanousd"] == 0
    assert (hit["tokens_in"], hit["tokens_out"]) == (miss["tokens_in"], miss["tokens_out"])
    assert hit["tokens_out"] == 8
    assert hit["model"] == "gpt-4o-mini" and hit["provider"] == ""
    assert hit["attempts"] == 0 and hit["status"] == 200
    assert r.json()["usage"]["completion_tokens"] == 8


def test_hits_count_against_rps_but_not_tokens(gateway, mock):
    gw = gateway({"tenants": {"cache-rl": tenant("cache-rl-key", "sk-cache-rl", rate={"rps": 3})}})
    b = body(unique("rps"))
    miss = post_chat(gw, b, key="sk-cache-rl")
    assert miss.headers["x-gateway-cache"] == "miss"
    time.sleep(1.05 - time.time() % 1.0)  # the start of a fresh rps window (UTC seconds)
    with ThreadPoolExecutor(5) as pool:
        hits = list(pool.map(lambda _: post_chat(gw, b, key="sk-cache-rl"), range(5)))
    codes = sorted(r.status_code for r in hits)
    assert codes == [200, 200, 200, 429, 429], codes
    assert all(r.headers["x-gateway-cache"] == "hit" for r in hits if r.status_code == 200)
    # Rows are written when each request ends: wait for every one of them.
    rows = [audit_rows(gw, r.headers["x-request-id"])[0] for r in [miss, *hits] if r.status_code == 200]
    assert [row["cache_hit"] for row in rows] == [0, 1, 1, 1]
    usage = admin(gw, "GET", "/admin/v1/tenants/cache-rl/usage").json()
    assert usage["spent_nanousd"] == sum(row["cost_nanousd"] for row in rows) > 0, usage
    assert usage["tokens_out"] == 8, f"hits used no upstream tokens: {usage}"


def test_metrics_count_results_and_bytes(gw, mock):
    b = body(unique("metrics"))
    post_chat(gw, b, key=CACHE_A)
    post_chat(gw, b, key=CACHE_A)
    text = httpx.get(gw.admin_url + "/metrics", timeout=5).text
    assert re.search(r'^llmgw_cache_requests_total\{result="hit",tenant="cache-a"\} [1-9]', text, re.M), text
    assert re.search(r'^llmgw_cache_requests_total\{result="miss",tenant="cache-a"\} [1-9]', text, re.M)
    assert re.search(r"^llmgw_cache_bytes [1-9]", text, re.M)


# --------------------------------------------------------------------------- memory bound


def test_memory_bound_holds_under_overfill(gateway, mock):
    max_bytes = 32 * 1024
    gw = gateway({"cache": {"max_bytes": max_bytes},
                  "tenants": {"cache-small": tenant("cache-small-key", "sk-cache-small")}})
    first = body(unique("first") + " [[mock: tokens=100]]")
    post_chat(gw, first, key="sk-cache-small")
    for i in range(60):
        r = post_chat(gw, body(unique(f"fill {i}") + " [[mock: tokens=100]]"), key="sk-cache-small")
        assert r.status_code == 200
    text = httpx.get(gw.admin_url + "/metrics", timeout=5).text
    used = int(re.search(r"^llmgw_cache_bytes (\d+)", text, re.M).group(1))
    evicted = int(float(re.search(r"^llmgw_cache_evictions_total (\S+)", text, re.M).group(1)))
    assert 0 < used <= max_bytes
    assert evicted > 0
    assert post_chat(gw, first, key="sk-cache-small").headers["x-gateway-cache"] == "miss", \
        "the oldest entry should have been evicted"


# --------------------------------------------------------------------------- stale on outage


def test_expired_answer_serves_when_every_provider_is_down(gateway, mock):
    gw = gateway({"tenants": {"cache-stale": tenant("cache-stale-key", "sk-cache-stale",
                                                    cache={"enabled": True, "ttl_s": 1})}})
    b = body(unique("stale"), model="llama-70b")
    first = post_chat(gw, b, key="sk-cache-stale")
    assert first.headers["x-gateway-cache"] == "miss"
    time.sleep(1.2)  # past the entry's 1 s TTL: no readiness signal exists for expiry
    # The header directive reaches the mock but is not part of the cache key.
    down = {"x-mock": "status=503"}
    r = post_chat(gw, b, key="sk-cache-stale", headers=down)
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-cache"] == "hit"
    assert r.headers["x-gateway-cache-stale"] == "true"
    assert r.headers["warning"].startswith("110")
    assert r.json() == first.json()
    assert upstream_calls(mock) == 2, "the expired entry was revalidated upstream first"
    row = audit_rows(gw, r.headers["x-request-id"])[0]
    assert (row["status"], row["cache_hit"], row["cost_nanousd"], row["error_code"]) == (200, 1, 0, "")
    # no-cache asks not to read the cache: the outage shows.
    r = post_chat(gw, b, key="sk-cache-stale", headers={**down, "cache-control": "no-cache"})
    assert r.status_code == 503
    # A request never answered before has nothing stale to fall back on.
    r = post_chat(gw, body(unique("never"), model="llama-70b"), key="sk-cache-stale", headers=down)
    assert r.status_code == 503


def test_fresh_entry_is_a_plain_hit_even_when_providers_are_down(gw, mock):
    b = body(unique("fresh-down"), model="llama-70b")
    first = post_chat(gw, b, key=CACHE_A)
    r = post_chat(gw, b, key=CACHE_A, headers={"x-mock": "status=503"})
    assert r.status_code == 200 and r.headers["x-gateway-cache"] == "hit"
    assert "x-gateway-cache-stale" not in r.headers
    assert r.json() == first.json()
    assert upstream_calls(mock) == 1


def test_open_circuits_still_serve_stored_answers(gateway, mock):
    gw = gateway({"tenants": {"cache-circuit": tenant("cache-circuit-key", "sk-cache-circuit")}})
    key = "sk-cache-circuit"
    fresh = body(unique("circuit-fresh"), model="llama-70b")
    first = post_chat(gw, fresh, key=key)
    assert first.headers["x-gateway-cache"] == "miss"
    down = {"x-mock": "status=503"}
    for i in range(5):  # five consecutive failures open the provider's circuit
        r = post_chat(gw, chat_body(f"sampled {i}", model="llama-70b"), key=key, headers=down)
        assert r.status_code == 503
    mock.reset()
    r = post_chat(gw, fresh, key=key, headers=down)
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-cache"] == "hit"
    assert "x-gateway-cache-stale" not in r.headers, "a fresh entry is not stale"
    assert r.json() == first.json()
    assert upstream_calls(mock) == 0, "an open circuit is not called"
    r = post_chat(gw, body(unique("circuit-new"), model="llama-70b"), key=key)
    assert r.status_code == 503 and "circuit open" in r.text
