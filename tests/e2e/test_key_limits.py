"""API keys with limits of their own (DESIGN "Keys inside a tenant"), through the real
binary, two gateway processes sharing one private `redis-server` (started by this
module, as in test_limits_shared.py; without redis-server these tests fail).

A request must fit both its tenant's and its key's limits, reserved together; a refusal
names the scope. Checked:

* the race: 100 requests released together over both processes, 80 on a key whose own
  budget fits 8 worst cases and 20 on the tenant's other key, the tenant's budget
  fitting 20: the limited key never gets more than 8 (its admitted worst cases and its
  settled spend stay within its budget), the tenant exactly 20 (its budget holds for
  the other key too), and every 402 names the scope that refused it;
* a key's rps limit, shared by both processes, refuses with a message naming the key
  while the tenant's other key is served in the same second, and the `x-ratelimit-*`
  headers show the tighter scope;
* a request that can never fit (`max_tokens` of 10**15 against a tokens-per-minute
  limit, the tenant's or the key's) is a 400 naming the limit, not a 429 to retry;
* `max_tokens` above the model's `max_output_tokens` is a 400 naming the model's bound
  (both endpoint formats), never forwarded.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import sha256_hex
from helpers import assert_anthropic_error, assert_openai_error, chat_body, messages_body, new_request_id
from limitslib import (LIM_MAX_OUT, PRICE, Call, assert_refused_row, call, is_stream_ok, row_of,
                       start_of_fresh_second, usage, usd, worst)
from test_limits_shared import RedisServer

# The race: 8 tokens 500 ms apart keep every admitted stream in flight until the whole
# burst has been answered, so what is admitted is decided by the reservations alone.
RACE_N, RACE_ON_CAPPED = 100, 80
RACE_BODY = chat_body("[[mock: gap_ms=500; tokens=8]] key race", model="lim", stream=True, max_tokens=50)
RACE_W = worst(RACE_BODY)[1]
KEY_FITS, TENANT_FITS = 8, 20
KEY_BUDGET = KEY_FITS * RACE_W + RACE_W // 2
TENANT_BUDGET = TENANT_FITS * RACE_W + RACE_W // 2

FAST_BODY = chat_body("[[mock: tokens=5]] go", model="lim", max_tokens=20)
KEY_RPS, TENANT_RPS = 2, 100
KEY_TPM, TENANT_TPM = 1000, 2_000_000

KEYS = {
    "capped": "sk-keylim-capped",
    "plain": "sk-keylim-plain",
    "slow": "sk-keylim-slow",
    "other": "sk-keylim-other",
}

TENANTS = {
    "kb": {
        "api_keys": [
            {"id": "kb/capped", "sha256": sha256_hex(KEYS["capped"]), "budget": {"monthly_usd": usd(KEY_BUDGET)}},
            {"id": "kb/plain", "sha256": sha256_hex(KEYS["plain"])},
        ],
        "models": ["lim"],
        "budget": {"monthly_usd": usd(TENANT_BUDGET)},
    },
    "kr": {
        "api_keys": [
            {"id": "kr/slow", "sha256": sha256_hex(KEYS["slow"]), "rate": {"rps": KEY_RPS, "tpm": KEY_TPM}},
            {"id": "kr/other", "sha256": sha256_hex(KEYS["other"])},
        ],
        "models": ["lim", "lim-open"],
        "rate": {"rps": TENANT_RPS, "tpm": TENANT_TPM},
    },
}
MODELS = {
    "lim": {"provider": "inhouse", "price": PRICE, "max_output_tokens": LIM_MAX_OUT},
    "lim-open": {"provider": "inhouse", "price": PRICE},  # no output bound: max_tokens is the bound
}


def overrides(redis_url: str, node: int) -> dict:
    # `max_body_bytes` only tells the factory's processes apart (one per distinct overrides).
    return {"models": MODELS, "tenants": TENANTS, "max_body_bytes": 4194304 + 20 + node,
            "counters": {"backend": "redis", "url": redis_url, "on_error": "fail_closed"}}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    r = RedisServer(tmp_path_factory.mktemp("redis-keys"))
    r.start()
    yield r.url
    r.stop()


@pytest.fixture(scope="module")
def nodes(gateway, redis_url):
    """Two gateway processes (two edge nodes) on one Redis."""
    return gateway(overrides(redis_url, 0)), gateway(overrides(redis_url, 1))


def message(c: Call) -> str:
    return json.loads(c.body)["error"]["message"]


def statuses(calls) -> dict:
    return dict(Counter(c.status if c.status == 200 else (c.status, message(c)) for c in calls))


# --------------------------------------------------------------------------- 1. the race


def test_race_of_100_over_two_processes_against_a_key_budget_and_its_tenant_budget(nodes, mock):
    assert usage(nodes[0], "kb")["spent_nanousd"] == 0
    assert KEY_BUDGET // RACE_W == KEY_FITS and TENANT_BUDGET // RACE_W == TENANT_FITS
    barrier = threading.Barrier(RACE_N)
    plan = [(nodes[i % 2], "capped" if i < RACE_ON_CAPPED else "plain") for i in range(RACE_N)]
    with ThreadPoolExecutor(max_workers=RACE_N) as ex:
        futs = [(gw, k, ex.submit(call, gw, "kb", RACE_BODY, rid=new_request_id("keyrace"), barrier=barrier,
                                  key=KEYS[k], warm=True)) for gw, k in plan]
        calls = [(gw, k, f.result()) for gw, k, f in futs]

    ok = [(k, c) for _, k, c in calls if c.status == 200]
    refused = [(k, c) for _, k, c in calls if c.status != 200]
    assert ok and refused, statuses(c for _, _, c in calls)
    # Precondition of exact counts: no admitted stream ended (settling, freeing room)
    # before the last refusal.
    assert max(c.t_end for _, c in refused) < min(c.t_end for _, c in ok), \
        "test timing: a refusal came after an admitted stream had ended; make the streams slower"
    on_capped = sum(1 for k, _ in ok if k == "capped")
    assert on_capped <= KEY_FITS, \
        f"{on_capped} admitted on a key whose budget fits {KEY_FITS}: {statuses(c for _, _, c in calls)}"
    assert len(ok) == TENANT_FITS, statuses(c for _, _, c in calls)
    for _, c in ok:
        assert is_stream_ok(c), c
    for k, c in refused:
        assert_openai_error(c.r, 402, "budget_exceeded")
        # The plain key can only meet the tenant's budget; the capped one either.
        scopes = ("this API key", "this tenant") if k == "capped" else ("this tenant",)
        assert any(message(c).startswith(f"budget exceeded for {s}: monthly") for s in scopes), (k, message(c))
    assert any(k == "capped" and "this API key" in message(c) for k, c in refused), \
        "the key's own budget refused none of its 80 requests"

    rows = {c.rid: row_of(gw, c) for gw, _, c in calls}
    capped_rows = [rows[c.rid] for k, c in ok if k == "capped"]
    for k, c in refused:
        assert_refused_row(rows[c.rid], 402, "budget_exceeded")
    for r in capped_rows:
        assert r["api_key_id"] == "kb/capped" and 0 < r["cost_nanousd"] < RACE_W, r
    # Zero overshoot at both scopes: what was reserved, and what was spent.
    assert on_capped * RACE_W <= KEY_BUDGET
    assert sum(r["cost_nanousd"] for r in capped_rows) <= KEY_BUDGET
    spent = sum(r["cost_nanousd"] for r in rows.values())
    assert spent <= TENANT_BUDGET
    assert len([q for q in mock.requests() if q["path"].endswith("/chat/completions")]) == TENANT_FITS
    for gw in nodes:  # both processes read the same shared counters
        u = usage(gw, "kb")
        assert u["spent_nanousd"] == spent and u["reserved_nanousd"] == 0, u
        assert u["requests"] == TENANT_FITS, u


# --------------------------------------------------------------------------- 2. a key's rps, shared


def test_a_key_rps_limit_refuses_naming_the_key_while_the_other_key_is_served(nodes):
    for _ in range(5):
        start_of_fresh_second()
        second = int(time.time())
        first = [call(nodes[i % 2], "kr", FAST_BODY, key=KEYS["slow"]) for i in range(KEY_RPS + 1)]
        other = call(nodes[1], "kr", FAST_BODY, key=KEYS["other"])
        if int(time.time()) == second:
            break
    else:
        pytest.skip("could not fit 4 requests into one second on this machine")
    assert [c.status for c in first] == [200] * KEY_RPS + [429], statuses(first)
    over = first[-1]
    err = assert_openai_error(over.r, 429, "rate_limited")
    assert err["message"] == "rate limit exceeded for this API key: requests per second", err
    assert over.headers.get("retry-after") == "1", over.headers
    # The tighter scope's figures: the key's 2 a second, none left.
    assert over.header_int("x-ratelimit-limit-requests") == KEY_RPS, over.headers
    assert over.header_int("x-ratelimit-remaining-requests") == 0, over.headers
    assert_refused_row(row_of(nodes[0], over), 429, "rate_limited")
    # Served across both processes: the limit is the shared one.
    assert first[0].header_int("x-ratelimit-remaining-requests") == 1, first[0].headers
    assert first[1].header_int("x-ratelimit-remaining-requests") == 0, first[1].headers
    # The tenant's other key is not held back by it, and sees the tenant's figures.
    assert other.status == 200, other
    assert other.header_int("x-ratelimit-limit-requests") == TENANT_RPS, other.headers
    assert other.header_int("x-ratelimit-remaining-requests") == TENANT_RPS - KEY_RPS - 1, other.headers
    # Tokens: the key's window (1000) is tighter than the tenant's.
    assert first[0].header_int("x-ratelimit-remaining-tokens") <= KEY_TPM, first[0].headers


# --------------------------------------------------------------------------- 3. never fits: 400


def test_a_request_that_can_never_fit_is_a_400_naming_the_limit(nodes, mock):
    mock.reset()
    huge = chat_body("hi", model="lim-open", max_tokens=10**15)
    tokens = worst(huge)[0]
    c = call(nodes[0], "kr", huge, key=KEYS["other"])
    err = assert_openai_error(c.r, 400, "invalid_request")
    assert err["message"] == (
        f"this request can use up to {tokens} tokens (max_tokens plus the prompt), above this "
        f"tenant's limit of {TENANT_TPM} tokens per minute: lower max_tokens"), err
    assert "retry-after" not in c.headers, c.headers
    assert_refused_row(row_of(nodes[0], c), 400, "invalid_request")

    # The key's own tokens per minute, on the other process.
    body = chat_body("hi", model="lim-open", max_tokens=KEY_TPM)
    c = call(nodes[1], "kr", body, key=KEYS["slow"])
    err = assert_openai_error(c.r, 400, "invalid_request")
    assert err["message"] == (
        f"this request can use up to {worst(body)[0]} tokens (max_tokens plus the prompt), above this "
        f"API key's limit of {KEY_TPM} tokens per minute: lower max_tokens"), err
    assert mock.requests() == [], "a refused request must not reach the provider"
    # The same request through the other key fits the tenant's window.
    ok = call(nodes[1], "kr", body, key=KEYS["other"])
    assert ok.status == 200, ok

    # A worst case above a key's whole budget: 400 as well, naming the key's budget.
    pricey = chat_body("hi", model="lim", max_tokens=LIM_MAX_OUT, messages=[
        {"role": "user", "content": "x" * (2 * KEY_BUDGET // 1000)}])
    assert KEY_BUDGET < worst(pricey)[1] < TENANT_BUDGET
    c = call(nodes[0], "kb", pricey, key=KEYS["plain"])
    assert c.status in (200, 402), c  # the tenant's whole budget is not the limit here
    c = call(nodes[0], "kb", pricey, key=KEYS["capped"])
    err = assert_openai_error(c.r, 400, "invalid_request")
    assert re.fullmatch(r"this request can cost up to [0-9.]+ USD \(max_tokens plus the prompt, at the model's "
                        r"prices\), above this API key's whole monthly budget of [0-9.]+ USD: lower max_tokens",
                        err["message"]), err
    assert f"whole monthly budget of {KEY_BUDGET / 1e9:.9f} USD" in err["message"], err


# --------------------------------------------------------------------------- 4. max_tokens above the model's bound


def test_max_tokens_above_the_models_max_output_tokens_is_a_400_never_forwarded(nodes, mock):
    mock.reset()
    bound = f"above model 'lim''s limit of {LIM_MAX_OUT} output tokens (max_output_tokens): lower max_tokens"
    c = call(nodes[0], "kr", chat_body("hi", model="lim", max_tokens=LIM_MAX_OUT + 1), key=KEYS["other"])
    err = assert_openai_error(c.r, 400, "invalid_request")
    assert err["message"] == f"'max_tokens' is {LIM_MAX_OUT + 1}, {bound}", err
    c = call(nodes[1], "kr", chat_body("hi", model="lim", stream=True, max_completion_tokens=100_000),
             key=KEYS["other"])
    assert bound in assert_openai_error(c.r, 400, "invalid_request")["message"]
    c = call(nodes[0], "kr", messages_body("hi", model="lim", max_tokens=LIM_MAX_OUT + 1), path="/v1/messages",
             key=KEYS["other"])
    assert bound in assert_anthropic_error(c.r, 400, "invalid_request_error")["message"]
    assert_refused_row(row_of(nodes[0], c), 400, "invalid_request")
    assert mock.requests() == [], "a refused request must not reach the provider"
    # At the bound: served, and sent as asked.
    c = call(nodes[0], "kr", chat_body("hi", model="lim", max_tokens=LIM_MAX_OUT), key=KEYS["other"])
    assert c.status == 200, c
    assert mock.only_request("/chat/completions")["max_tokens"] == LIM_MAX_OUT
