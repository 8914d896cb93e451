"""Budgets and rate limits (issue 5), through the binary and the mock provider.

Reserve then settle: before anything goes upstream the gateway reserves the request's
worst case -- tokens = ceil(body bytes / 2) + output bound, cost = that many prompt
tokens at the input price plus the output bound at the output price (the output bound
is the client's `max_tokens`, else the model's `max_output_tokens`, which is then sent
upstream) -- and settles to the actual cost and tokens (the audit row's) at the end.
Checked here: the monthly budget is never overshot however many requests race (402
`budget_exceeded`), a request that can never fit (a worst case above the whole budget,
or `max_tokens` above the model's `max_output_tokens`) is refused with 400 without an
upstream call, rps / concurrency / tpm give 429 `rate_limited` with `retry-after`,
the `x-ratelimit-*` headers carry exact values, a flooding tenant leaves another
tenant's counters alone, the admin usage endpoint agrees with the audit rows, and the
hourly budget stops a tenant within the hour.

Every figure is computed from the config below and the exact bytes each request sends:
the test model costs 1000 nano-USD per input token and 2000 per output token, so a
worst case is `ceil(bytes / 2) * 1000 + max_tokens * 2000`.

All tenants live on one gateway process of this module (counters are per tenant, and
each test has tenants of its own); the mock's `[[mock: gap_ms=..; tokens=..]]`
directives make streams slow enough to be in flight together.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest

from helpers import assert_anthropic_error, assert_openai_error, chat_body, messages_body, new_request_id
from limitslib import (BIG_MAX_OUT, LIM_MAX_OUT, PRICE, Call, admin_get, assert_refused_row, burst, call,
                       is_stream_ok, raw, retry_after, row_of, spend_until_refused, start_of_fresh_second,
                       tenant_rows, usage, usd, wait_rows, worst, _tenant)

# The race: slow streams (5 tokens, 300 ms apart) so that every request of the burst
# reaches admission while the admitted ones are still in flight.
RACE_N = 40
RACE_FITS = 10
RACE_BODY = chat_body("[[mock: gap_ms=300; tokens=5]] race", model="lim", stream=True, max_tokens=50)
RACE_W = worst(RACE_BODY)[1]
RACE_BUDGET = RACE_FITS * RACE_W + RACE_W // 2

# Fast non-streamed requests with a known worst case.
FAST_PROMPT = "[[mock: tokens=40]] go"
FAST_BODY = chat_body(FAST_PROMPT, model="lim", max_tokens=50)
FAST_W = worst(FAST_BODY)[1]

# Hourly: three worst cases and a half fit the hour; the month is far larger.
HOURLY_SLOW_BODY = chat_body("[[mock: gap_ms=200; tokens=4]] hour", model="lim", stream=True, max_tokens=50)
HOURLY_SLOW_W = worst(HOURLY_SLOW_BODY)[1]
HOURLY_BUDGET = 3 * HOURLY_SLOW_W + HOURLY_SLOW_W // 2

# Noisy neighbour: A's budget fits NOISY_HUGE_BODY's worst case (so it is not a 400),
# but not once A has spent a few of its FAST_BODY requests (402).
NOISY_HUGE_BODY = chat_body("[[mock: tokens=1]] huge", model="lim", max_tokens=LIM_MAX_OUT)
NOISY_A_BUDGET = 1_000_000
assert worst(NOISY_HUGE_BODY)[1] < NOISY_A_BUDGET < 2 * worst(NOISY_HUGE_BODY)[1]

TPM = 2000
HDR_RPS, HDR_TPM = 1000, 1_000_000


OVERRIDES = {
    "models": {
        "lim": {"provider": "inhouse", "price": PRICE, "max_output_tokens": LIM_MAX_OUT},
        "lim-big": {"provider": "inhouse", "price": PRICE, "max_output_tokens": BIG_MAX_OUT},
    },
    "tenants": {
        "race": _tenant("race", budget={"monthly_usd": usd(RACE_BUDGET)}),
        "cap": _tenant("cap", ["lim", "lim-big"], budget={"monthly_usd": 0.01}),
        "rps": _tenant("rps", rate={"rps": 3}),
        "conc": _tenant("conc", rate={"concurrency": 2}),
        "tpm": _tenant("tpm", ["lim", "lim-big"], rate={"tpm": TPM}),
        "hdr": _tenant("hdr", rate={"rps": HDR_RPS, "tpm": HDR_TPM}),
        "noisy-a": _tenant("noisy-a", rate={"rps": 5, "concurrency": 2},
                           budget={"monthly_usd": usd(NOISY_A_BUDGET)}),
        "noisy-b": _tenant("noisy-b", rate={"rps": HDR_RPS, "tpm": HDR_TPM}, budget={"monthly_usd": 10}),
        "usage": _tenant("usage", ["lim", "lim-big"], budget={"monthly_usd": 1}),
        "hourly": _tenant("hourly", budget={"monthly_usd": 10, "hourly_usd": usd(HOURLY_BUDGET)}),
    },
}


@pytest.fixture(scope="module")
def gw(gateway):
    return gateway(OVERRIDES)


# --------------------------------------------------------------------------- 1. the race


def test_concurrent_burst_never_overshoots_the_monthly_budget(gw, mock):
    """40 streams race for a budget that fits 10 worst cases: exactly 10 are admitted and
    the rest get 402 at once; everything settles at the actual cost (below the worst
    case), which frees room for more requests one by one until the budget is really
    used up -- and the settled spend never exceeds it."""
    assert usage(gw, "race")["budget_nanousd"] == RACE_BUDGET
    fits = RACE_BUDGET // RACE_W
    assert fits == RACE_FITS

    barrier = threading.Barrier(RACE_N)
    with ThreadPoolExecutor(max_workers=RACE_N) as ex:
        futs = [ex.submit(call, gw, "race", RACE_BODY, rid=new_request_id("race"), barrier=barrier)
                for _ in range(RACE_N)]
        # While the admitted streams are in flight, their worst cases are held.
        deadline = time.monotonic() + 10
        while sum(f.done() for f in futs) < RACE_N - fits and time.monotonic() < deadline:
            time.sleep(0.01)
        mid, t_mid = usage(gw, "race"), time.monotonic()
        calls = [f.result() for f in futs]

    ok = [c for c in calls if c.status == 200]
    refused = [c for c in calls if c.status != 200]
    # Precondition of the exact count: every refusal came before any admitted stream ended
    # (a settle frees room, so a later request could rightly be admitted).
    assert refused and ok, calls
    assert max(c.t_end for c in refused) < min(c.t_end for c in ok), \
        "test timing: a refusal came after an admitted stream had ended; make the streams slower"
    assert len(ok) == fits, f"{len(ok)} of {RACE_N} admitted for a budget fitting {fits}: {[c.status for c in calls]}"
    for c in refused:
        assert_openai_error(c.r, 402, "budget_exceeded")
        assert c.t_end - c.t_head < 1.0
    for c in ok:
        assert is_stream_ok(c), c
    if t_mid < min(c.t_end for c in ok):
        assert mid["reserved_nanousd"] == fits * RACE_W, mid
        assert mid["spent_nanousd"] == 0, mid
        assert mid["remaining_nanousd"] == RACE_BUDGET - fits * RACE_W, mid

    rows = wait_rows(gw, calls)
    for c, row in zip(calls, rows):
        if c.status == 402:
            assert_refused_row(row, 402, "budget_exceeded")
        else:
            assert row["status"] == 200 and 0 < row["cost_nanousd"] < RACE_W, row
    assert len([q for q in mock.requests() if q["path"].endswith("/chat/completions")]) == fits, \
        "only the admitted requests may reach the provider"

    u = usage(gw, "race")
    spent = sum(r["cost_nanousd"] for r in rows)
    assert u["spent_nanousd"] == spent <= RACE_BUDGET, u
    assert u["reserved_nanousd"] == 0, u
    assert u["remaining_nanousd"] == RACE_BUDGET - spent, u

    # Settled below the worst case: room again, one request at a time, admitted exactly
    # while spent + worst case <= budget.
    admitted_after = 0
    for _ in range(200):
        before = usage(gw, "race")
        assert before["reserved_nanousd"] == 0, before
        c = call(gw, "race", FAST_BODY)
        fits_now = before["spent_nanousd"] + FAST_W <= RACE_BUDGET
        if not fits_now:
            assert_openai_error(c.r, 402, "budget_exceeded")
            assert_refused_row(row_of(gw, c), 402, "budget_exceeded")
            break
        assert c.status == 200, f"spent {before['spent_nanousd']} + worst case {FAST_W} <= {RACE_BUDGET}: {c}"
        row_of(gw, c)
        admitted_after += 1
    else:
        pytest.fail("the budget was never used up")
    assert admitted_after >= 1, "settling at the actual cost must free the unused reservations"

    u = usage(gw, "race")
    rows = tenant_rows(gw, "race")
    spent = sum(r["cost_nanousd"] for r in rows)
    assert u["spent_nanousd"] == spent <= RACE_BUDGET, (u, spent)
    assert RACE_BUDGET - spent < FAST_W, "refused while the worst case still fitted"
    assert u["requests"] == sum(r["status"] == 200 for r in rows), u


# --------------------------------------------------------------------------- 2. worst case does not fit


def test_400_when_the_request_can_never_fit_no_upstream_call(gw, mock):
    """A budget of $0.01 with nothing spent: a request that could cost more than the
    whole budget (no max_tokens on a model whose output cap is huge), or that asks for
    more than the model's max_output_tokens, is refused with 400 in the endpoint's
    format (not a 402 to retry later), before any upstream call, with an audit row."""
    assert usage(gw, "cap")["spent_nanousd"] == 0
    budget = 10_000_000
    over_cap = f"'max_tokens' is 100000, above model 'lim''s limit of {LIM_MAX_OUT} output tokens"
    cases = [
        ("/v1/chat/completions", chat_body("hi", model="lim", max_tokens=100_000), over_cap),
        ("/v1/chat/completions", chat_body("hi", model="lim", stream=True, max_completion_tokens=100_000),
         over_cap),
        ("/v1/chat/completions", chat_body("hi", model="lim-big"),  # the model's cap is the bound
         "above this tenant's whole monthly budget of 0.010000000 USD: lower max_tokens"),
        ("/v1/messages", messages_body("hi", model="lim", max_tokens=100_000), over_cap),
        ("/v1/messages", messages_body("hi", model="lim-big", stream=True, max_tokens=BIG_MAX_OUT),
         "above this tenant's whole monthly budget"),
    ]
    calls = []
    for path, body, message in cases:
        assert worst(body)[1] > budget
        c = call(gw, "cap", body, path=path)
        if path == "/v1/messages":
            err = assert_anthropic_error(c.r, 400, "invalid_request_error")
        else:
            err = assert_openai_error(c.r, 400, "invalid_request")
        assert message in err["message"], err
        assert "retry-after" not in c.headers, c.headers
        calls.append(c)
    assert mock.requests() == [], "a refused request must not reach the provider"
    for c, (path, _, _) in zip(calls, cases):
        row = row_of(gw, c)
        assert_refused_row(row, 400, "invalid_request")
        assert row["tenant"] == "cap" and row["endpoint"] == ("messages" if "messages" in path else "chat_completions")
    assert usage(gw, "cap")["requests"] == 0

    # Not a spend problem: a request whose worst case fits is served, and without a
    # client max_tokens the model's cap (what was reserved) is sent upstream.
    body = chat_body("hi", model="lim")
    assert worst(body)[1] <= budget
    c = call(gw, "cap", body)
    assert c.status == 200, c
    up = mock.only_request("/chat/completions")
    assert up["max_tokens"] == LIM_MAX_OUT, up
    u = usage(gw, "cap")
    assert u["reserved_nanousd"] == 0 and u["spent_nanousd"] == row_of(gw, c)["cost_nanousd"] > 0, u


# --------------------------------------------------------------------------- 3. rps


def test_rps_limit_refuses_the_extra_request_in_the_same_second(gw, mock):
    rps = 3
    for attempt in range(3):
        start_of_fresh_second()
        second = int(time.time())
        mock.reset()
        calls = [call(gw, "rps", FAST_BODY) for _ in range(rps)]
        extra = call(gw, "rps", FAST_BODY)
        extra_msg = call(gw, "rps", messages_body("hi", model="lim", max_tokens=5), path="/v1/messages")
        ups = len(mock.requests())
        if int(time.time()) == second:
            break
    else:
        pytest.skip("could not fit five requests into one second")

    for i, c in enumerate(calls):
        assert c.status == 200, c
        assert c.header_int("x-ratelimit-limit-requests") == rps, c.headers
        assert c.header_int("x-ratelimit-remaining-requests") == rps - 1 - i, c.headers
    assert_openai_error(extra.r, 429, "rate_limited")
    assert retry_after(extra) == 1
    assert extra.header_int("x-ratelimit-limit-requests") == rps, extra.headers
    assert extra.header_int("x-ratelimit-remaining-requests") == 0, extra.headers
    assert_anthropic_error(extra_msg.r, 429, "rate_limit_error")
    assert retry_after(extra_msg) == 1
    assert ups == rps, "refused requests must not reach the provider"
    assert_refused_row(row_of(gw, extra), 429, "rate_limited")
    assert_refused_row(row_of(gw, extra_msg), 429, "rate_limited")

    # The next second has room again.
    start_of_fresh_second()
    c = call(gw, "rps", FAST_BODY)
    assert c.status == 200, c
    assert c.header_int("x-ratelimit-remaining-requests") == rps - 1, c.headers


# --------------------------------------------------------------------------- 4. concurrency


def test_concurrency_limit_refuses_a_third_request_in_flight(gw, mock):
    slow = chat_body("[[mock: gap_ms=250; tokens=4]] conc", model="lim", stream=True, max_tokens=20)
    heads = [threading.Event(), threading.Event()]
    with ThreadPoolExecutor(max_workers=2) as ex:
        futs = [ex.submit(call, gw, "conc", slow, on_head=heads[i]) for i in range(2)]
        assert all(h.wait(10) for h in heads), "the two slow streams did not start"
        third = call(gw, "conc", FAST_BODY)
        third_stream = call(gw, "conc", chat_body("hi", model="lim", stream=True, max_tokens=5))
        t_refused = time.monotonic()
        streams = [f.result() for f in futs]
    assert t_refused < min(s.t_end for s in streams), "test timing: the slow streams ended too early"
    for s in streams:
        assert is_stream_ok(s), s
    assert_openai_error(third.r, 429, "rate_limited")
    assert retry_after(third) >= 1
    assert_openai_error(third_stream.r, 429, "rate_limited")
    assert_refused_row(row_of(gw, third), 429, "rate_limited")
    assert len(mock.requests()) == 2

    # The slots are free again once a stream has ended (its audit row is written after it settled).
    row_of(gw, streams[0])
    c = call(gw, "conc", FAST_BODY)
    assert c.status == 200, c


def test_concurrency_slot_frees_while_another_stream_is_still_in_flight(gw):
    short = chat_body("[[mock: gap_ms=50; tokens=2]] short", model="lim", stream=True, max_tokens=20)
    long = chat_body("[[mock: gap_ms=400; tokens=6]] long", model="lim", stream=True, max_tokens=20)
    head = threading.Event()
    with ThreadPoolExecutor(max_workers=2) as ex:
        f_long = ex.submit(call, gw, "conc", long, on_head=head)
        assert head.wait(10)
        s = call(gw, "conc", short)
        assert s.status == 200, s
        row_of(gw, s)
        c = call(gw, "conc", FAST_BODY)   # one slot held by `long`, one free
        t = time.monotonic()
        lg = f_long.result()
    assert t < lg.t_end, "test timing: the long stream ended too early"
    assert c.status == 200, c


# --------------------------------------------------------------------------- 5. tpm


def body_with_worst_tokens(target: int, prompt: str = FAST_PROMPT) -> dict:
    """A chat body to `lim-big` (whose output bound leaves room for any max_tokens
    here) whose reserved tokens are exactly `target`."""
    guess = target - math.ceil(len(raw(chat_body(prompt, model="lim-big", max_tokens=target))) / 2)
    for m in range(max(1, guess - 5), guess + 6):
        b = chat_body(prompt, model="lim-big", max_tokens=m)
        if worst(b)[0] == target:
            return b
    raise AssertionError(f"no max_tokens gives a worst case of {target} tokens")


def test_tpm_reserves_worst_case_tokens_and_settles_to_actual(gw, mock):
    def used_tokens() -> int:
        return sum(r["tokens_in"] + r["tokens_out"] for r in tenant_rows(gw, "tpm") if r["status"] == 200)

    b1 = body_with_worst_tokens(600)
    c1 = call(gw, "tpm", b1)
    assert c1.status == 200, c1
    assert c1.header_int("x-ratelimit-remaining-tokens") == TPM - 600, c1.headers
    row1 = row_of(gw, c1)
    a1 = row1["tokens_in"] + row1["tokens_out"]
    assert 0 < a1 < 600 and used_tokens() == a1

    # One token more than is left: refused, and the headers say what is left.
    over = call(gw, "tpm", body_with_worst_tokens(TPM - a1 + 1))
    assert_openai_error(over.r, 429, "rate_limited")
    assert 1 <= retry_after(over) <= 60
    assert over.header_int("x-ratelimit-remaining-tokens") == TPM - a1, over.headers
    assert_refused_row(row_of(gw, over), 429, "rate_limited")

    # Exactly what is left: admitted (remaining 0 while it is in flight).
    c2 = call(gw, "tpm", body_with_worst_tokens(TPM - a1))
    assert c2.status == 200, c2
    assert c2.header_int("x-ratelimit-remaining-tokens") == 0, c2.headers

    # Settled to the actual tokens: the room comes back.
    row2 = row_of(gw, c2)
    a2 = row2["tokens_in"] + row2["tokens_out"]
    assert a2 < TPM - a1
    c3 = call(gw, "tpm", b1)
    assert c3.status == 200, c3
    assert c3.header_int("x-ratelimit-remaining-tokens") == TPM - a1 - a2 - 600, c3.headers
    row_of(gw, c3)
    assert len(mock.requests()) == 3


# --------------------------------------------------------------------------- 6. x-ratelimit headers


def test_ratelimit_headers_on_successful_responses(gw):
    # Requests: counted per UTC second.
    for _ in range(3):
        start_of_fresh_second()
        second = int(time.time())
        a = call(gw, "hdr", FAST_BODY)
        b = call(gw, "hdr", chat_body("hi", model="lim", stream=True, max_tokens=5))
        if int(time.time()) == second:
            break
    else:
        pytest.skip("could not fit two requests into one second")
    for c, remaining in ((a, HDR_RPS - 1), (b, HDR_RPS - 2)):
        assert c.status == 200, c
        assert c.header_int("x-ratelimit-limit-requests") == HDR_RPS, c.headers
        assert c.header_int("x-ratelimit-remaining-requests") == remaining, c.headers
        assert c.header_int("x-ratelimit-remaining-tokens") is not None, c.headers
    wait_rows(gw, [a, b])

    # Tokens: what is left of the minute after this request's worst case, with every
    # earlier request settled at its actual tokens.
    cases = [
        ("/v1/chat/completions", FAST_BODY),
        ("/v1/chat/completions", chat_body("[[mock: tokens=7]] s", model="lim", stream=True, max_tokens=30)),
        ("/v1/messages", messages_body("[[mock: tokens=9]] m", model="lim", max_tokens=40)),
        ("/v1/messages", messages_body("[[mock: tokens=3]] ms", model="lim", stream=True, max_tokens=60)),
    ]
    for path, body in cases:
        used = sum(r["tokens_in"] + r["tokens_out"] for r in tenant_rows(gw, "hdr"))
        c = call(gw, "hdr", body, path=path)
        assert c.status == 200, c
        assert c.header_int("x-ratelimit-limit-requests") == HDR_RPS, (path, c.headers)
        assert 0 <= c.header_int("x-ratelimit-remaining-requests") < HDR_RPS, (path, c.headers)
        assert c.header_int("x-ratelimit-remaining-tokens") == HDR_TPM - used - worst(body)[0], (path, body)
        row_of(gw, c)


# --------------------------------------------------------------------------- 7. noisy neighbour


def test_noisy_neighbour_does_not_touch_another_tenants_counters(gw):
    """Tenant A (rps 5, concurrency 2, $0.01 a month) is flooded with cheap requests (429
    beyond 5 a second) and requests whose worst case exceeds its budget (402) while
    tenant B sends its own requests: all of B's succeed, and B's headers and usage
    count B's requests only."""
    stop = threading.Event()
    a_calls: list[Call] = []
    lock = threading.Lock()

    def flood(i: int) -> None:
        while not stop.is_set():
            i += 1
            c = call(gw, "noisy-a", NOISY_HUGE_BODY if i % 3 == 0 else FAST_BODY)
            with lock:
                a_calls.append(c)

    b_calls: list[Call] = []
    b_worst = 0
    with ThreadPoolExecutor(max_workers=4) as ex:
        futs = [ex.submit(flood, i) for i in range(4)]
        try:
            time.sleep(0.1)
            for i in range(20):
                body = FAST_BODY if i % 2 else chat_body("[[mock: tokens=5]] b", model="lim", stream=True, max_tokens=20)
                b_worst += worst(body)[0]
                b_calls.append(call(gw, "noisy-b", body))
            # The flood keeps going until A has met both kinds of refusal.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with lock:
                    if any(c.status == 402 for c in a_calls) and any(c.status == 429 for c in a_calls):
                        break
                time.sleep(0.02)
        finally:
            stop.set()
            for f in futs:
                f.result()

    statuses = sorted({c.status for c in a_calls})
    assert any(c.status == 402 and c.body and b"budget exceeded for this tenant: monthly" in c.body
               for c in a_calls), "a 402 that names the tenant's budget"
    assert set(statuses) <= {200, 402, 429}, statuses
    assert 429 in statuses and 402 in statuses, f"tenant A was not limited: {statuses}"
    for c in b_calls:
        assert c.status == 200, c
        assert c.header_int("x-ratelimit-limit-requests") == HDR_RPS, c.headers
        assert c.header_int("x-ratelimit-remaining-requests") >= HDR_RPS - len(b_calls), c.headers
        assert c.header_int("x-ratelimit-remaining-tokens") >= HDR_TPM - b_worst, c.headers

    b_rows = wait_rows(gw, b_calls)
    a_rows = wait_rows(gw, a_calls)
    ub = usage(gw, "noisy-b")
    assert ub["requests"] == len(b_calls), ub
    assert ub["spent_nanousd"] == sum(r["cost_nanousd"] for r in b_rows), ub
    assert ub["tokens_in"] == sum(r["tokens_in"] for r in b_rows), ub
    assert ub["tokens_out"] == sum(r["tokens_out"] for r in b_rows), ub
    ua = usage(gw, "noisy-a")
    assert ua["requests"] == sum(r["status"] == 200 for r in a_rows), ua
    assert ua["spent_nanousd"] == sum(r["cost_nanousd"] for r in a_rows) <= NOISY_A_BUDGET, ua
    assert ua["reserved_nanousd"] == 0 and ub["reserved_nanousd"] == 0


# --------------------------------------------------------------------------- 8. usage endpoint


def test_usage_endpoint_matches_the_audit_rows(gw):
    calls = [
        call(gw, "usage", chat_body("[[mock: tokens=11]] one", model="lim", max_tokens=50)),
        call(gw, "usage", chat_body("[[mock: tokens=13]] two", model="lim", stream=True, max_tokens=50)),
        call(gw, "usage", messages_body("[[mock: tokens=17]] three", model="lim", max_tokens=50),
             path="/v1/messages"),
        call(gw, "usage", messages_body("[[mock: tokens=19]] four", model="lim", stream=True, max_tokens=50),
             path="/v1/messages"),
        # Above lim's max_output_tokens (and the $1 budget): 400, not counted.
        call(gw, "usage", chat_body("[[mock: tokens=3]] five", model="lim", max_tokens=600_000)),
    ]
    assert [c.status for c in calls] == [200, 200, 200, 200, 400], calls
    rows = wait_rows(gw, calls)
    assert all(r["tenant"] == "usage" for r in rows)
    # Rows reach the spool in the order requests end, which need not be the order of the calls.
    by_id = lambda rs: sorted(rs, key=lambda r: r["request_id"])  # noqa: E731
    assert by_id(rows) == by_id(tenant_rows(gw, "usage")), "the tenant has no other rows"

    r = admin_get(gw, "/admin/v1/tenants/usage/usage")
    assert r.status_code == 200 and r.headers.get("content-type", "").startswith("application/json"), r
    u = r.json()
    spent = sum(x["cost_nanousd"] for x in rows)
    assert spent > 0
    assert u["tenant"] == "usage"
    assert u["month"] == dt.datetime.now(dt.timezone.utc).strftime("%Y-%m"), u
    assert u["spent_nanousd"] == spent, (u, rows)
    assert u["tokens_in"] == sum(x["tokens_in"] for x in rows), u
    assert u["tokens_out"] == sum(x["tokens_out"] for x in rows), u
    assert u["requests"] == sum(x["status"] == 200 for x in rows) == 4, u
    assert u["reserved_nanousd"] == 0, u
    assert u["budget_nanousd"] == 1_000_000_000, u
    assert u["remaining_nanousd"] == 1_000_000_000 - spent, u
    for field, nano in (("spent_usd", u["spent_nanousd"]), ("budget_usd", u["budget_nanousd"]),
                        ("remaining_usd", u["remaining_nanousd"])):
        v = u[field]
        assert isinstance(v, str) and v.replace(".", "", 1).isdigit(), (field, v)
        assert Decimal(v) * 1_000_000_000 == nano, (field, v, nano)

    # No budget: the budget fields say so.
    nb = usage(gw, "rps")
    assert nb["budget_nanousd"] is None and nb["remaining_nanousd"] is None, nb

    assert admin_get(gw, "/admin/v1/tenants/usage/usage", token=None).status_code == 401
    assert admin_get(gw, "/admin/v1/tenants/usage/usage", token="not-the-admin-token").status_code == 401
    assert admin_get(gw, "/admin/v1/tenants/no-such-tenant/usage").status_code == 404


def test_usage_endpoint_reports_this_hours_spend(gw):
    """Brief: the usage view also carries `spend_this_hour_nanousd` and
    `spend_hourly_avg_nanousd` (the spend velocity); on a fresh process the trailing
    average is 0 and this hour's spend is the sum of this hour's rows."""
    c = call(gw, "usage", chat_body("[[mock: tokens=5]] hour", model="lim", max_tokens=20))
    assert c.status == 200, c
    row_of(gw, c)
    hour_ms = int(time.time() // 3600 * 3_600_000)
    u = usage(gw, "usage")
    rows = tenant_rows(gw, "usage")
    missing = {"spend_this_hour_nanousd", "spend_hourly_avg_nanousd"} - set(u)
    assert not missing, f"usage view lacks {missing}: {u}"
    assert u["spend_this_hour_nanousd"] == sum(r["cost_nanousd"] for r in rows if r["ts_ms"] >= hour_ms), u
    assert u["spend_hourly_avg_nanousd"] == 0, u


# --------------------------------------------------------------------------- 9. hourly budget


def test_hourly_budget_stops_the_tenant_within_the_hour(gw):
    """hourly_usd fits 3.5 worst cases, the month 10 USD: a burst admits exactly 3, and
    one request at a time goes on while this hour's spend + worst case fits."""
    now = time.time()
    if 3600 - now % 3600 < 15:
        time.sleep(3600 - now % 3600 + 0.5)   # do not straddle an hour boundary
    hour = int(time.time() // 3600)
    fits = HOURLY_BUDGET // HOURLY_SLOW_W
    assert fits == 3

    calls = burst(gw, "hourly", HOURLY_SLOW_BODY, 8, "hourly")
    ok = [c for c in calls if c.status == 200]
    refused = [c for c in calls if c.status != 200]
    assert max(c.t_end for c in refused) < min(c.t_end for c in ok), "test timing: streams too fast"
    assert len(ok) == fits, [c.status for c in calls]
    for c in refused:
        assert_openai_error(c.r, 402, "budget_exceeded")
        ra = retry_after(c)
        to_next_hour = 3600 - time.time() % 3600
        assert to_next_hour - 3 <= ra <= to_next_hour + 3, (ra, to_next_hour)
    wait_rows(gw, calls)

    spend_until_refused([gw], "hourly", FAST_BODY,
                        lambda: sum(r["cost_nanousd"] for r in tenant_rows(gw, "hourly")), HOURLY_BUDGET)
    assert int(time.time() // 3600) == hour, "the hour rolled during the test"

    spent = sum(r["cost_nanousd"] for r in tenant_rows(gw, "hourly"))
    assert spent <= HOURLY_BUDGET
    u = usage(gw, "hourly")
    assert u["spent_nanousd"] == spent and u["remaining_nanousd"] > 10 * FAST_W, \
        "the refusal came from the hourly budget, not the monthly one"
