"""The spend guard (issue 17) through the binary and the mock provider.

Each guarded tenant here is new (no spend in the 24 hours before this one), so its
baseline is `min_hourly_usd` and the guard engages once this hour's spend passes
`velocity_factor x min_hourly_usd` = 10 x 0.00005 USD = 500,000 nano-USD: about six of
the test's requests (40 output tokens at 2000 nano-USD each plus the prompt). The
background check runs every second; the tests wait on the usage API's `guard.engaged`
(the readiness signal), never on a fixed sleep.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from conftest import ADMIN_TOKEN
from helpers import assert_anthropic_error, assert_openai_error, chat_body, messages_body
from limitslib import PRICE, assert_refused_row, call, row_of, start_of_fresh_second, usage, _tenant

GUARD = {"velocity_factor": 10, "min_hourly_usd": 0.00005}
THRESHOLD = 500_000  # 10 x 0.00005 USD, in nano-USD
BODY = chat_body("[[mock: tokens=40]] spend", model="lim", max_tokens=50)

OVERRIDES = {
    "models": {"lim": {"provider": "inhouse", "price": PRICE, "max_output_tokens": 256}},
    "tenants": {
        "g-block": _tenant("g-block", guard={**GUARD, "action": "block"}),
        "g-throttle": _tenant("g-throttle", guard={**GUARD, "action": "throttle", "throttle_rps": 1}),
        "g-alert": _tenant("g-alert", guard={**GUARD, "action": "alert"}),
        "g-none": _tenant("g-none"),
    },
}


@pytest.fixture(scope="module")
def gw(gateway):
    return gateway(OVERRIDES)


def admin_post(gw, path: str, body) -> httpx.Response:
    with httpx.Client(timeout=10) as c:
        return c.post(f"{gw.admin_url}{path}", json=body, headers={"authorization": f"Bearer {ADMIN_TOKEN}"})


def engaged_metric(gw, tenant: str) -> float | None:
    text = httpx.get(f"{gw.admin_url}/metrics", timeout=5).text
    m = re.search(rf'^llmgw_spend_guard_engaged\{{tenant="{tenant}"\}} (\S+)$', text, re.M)
    return None if m is None else float(m.group(1))


def wait_guard(gw, tenant: str, engaged: bool, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        g = usage(gw, tenant)["guard"]
        if g["engaged"] == engaged:
            return g
        assert time.monotonic() < deadline, f"guard of {tenant} not engaged={engaged} after {timeout}s: {g}"
        time.sleep(0.05)


def run_away(gw, tenant: str) -> dict:
    """Spends until this hour's spend passes the threshold (every request served until
    then), then waits for the guard; returns its state and the time it took."""
    for i in range(40):
        u = usage(gw, tenant)
        assert not u["guard"]["engaged"], f"engaged below the threshold: {u}"
        if u["spend_this_hour_nanousd"] > THRESHOLD:
            break
        c = call(gw, tenant, BODY)
        assert c.status == 200, c
    else:
        raise AssertionError("the threshold was never passed")
    t0 = time.monotonic()
    g = wait_guard(gw, tenant, True)
    g["engage_s"] = time.monotonic() - t0
    assert g["threshold_nanousd"] == THRESHOLD, g
    assert g["spend_this_hour_nanousd"] > THRESHOLD, g
    assert g["engaged_since"], g
    return g


def test_block_refuses_with_402_spend_guard_until_on_call_clears_it(gw):
    assert engaged_metric(gw, "g-block") == 0
    g = run_away(gw, "g-block")
    assert g["engage_s"] < 3.0, g  # one background check (1 s) plus this poll
    assert g["action"] == "block"
    c = call(gw, "g-block", BODY)
    body = assert_openai_error(c.r, 402, "spend_guard")
    assert body["type"] == "insufficient_quota"
    assert "spend guard" in body["message"]
    assert int(c.headers["retry-after"]) > 3600
    assert_refused_row(row_of(gw, c), 402, "spend_guard")
    # The Anthropic endpoint refuses in its own format.
    m = call(gw, "g-block", messages_body("hi", model="lim", max_tokens=20), path="/v1/messages")
    assert_anthropic_error(m.r, 402, "billing_error")
    assert engaged_metric(gw, "g-block") == 1
    # Another tenant spending the same is untouched.
    for _ in range(8):
        assert call(gw, "g-none", BODY).status == 200

    # On-call: bad bodies are refused, the clear works and holds for for_s.
    assert admin_post(gw, "/admin/v1/tenants/g-block/guard/clear", {"for_s": "soon"}).status_code == 400
    assert admin_post(gw, "/admin/v1/tenants/g-block/guard/clear", {"for": 60}).status_code == 400
    assert admin_post(gw, "/admin/v1/tenants/nobody/guard/clear", {}).status_code == 404
    assert admin_post(gw, "/admin/v1/tenants/g-none/guard/clear", {}).status_code == 409
    r = admin_post(gw, "/admin/v1/tenants/g-block/guard/clear", {"for_s": 120})
    assert r.status_code == 200, r.text
    assert r.json()["was_engaged"] is True and r.json()["for_s"] == 120
    assert call(gw, "g-block", BODY).status == 200
    g = usage(gw, "g-block")["guard"]
    assert not g["engaged"] and g["cleared_until"], g
    assert engaged_metric(gw, "g-block") == 0
    # Still far over the threshold, but cleared: the next check leaves it down.
    checked = g["checked_at"]
    deadline = time.monotonic() + 5
    while usage(gw, "g-block")["guard"]["checked_at"] == checked:
        assert time.monotonic() < deadline, "no guard check within 5 s"
        time.sleep(0.05)
    assert not usage(gw, "g-block")["guard"]["engaged"]
    assert call(gw, "g-block", BODY).status == 200


def test_throttle_holds_the_tenant_to_throttle_rps_with_429_spend_guard(gw):
    run_away(gw, "g-throttle")
    start_of_fresh_second()
    calls = [call(gw, "g-throttle", BODY) for _ in range(4)]
    ok = [c for c in calls if c.status == 200]
    refused = [c for c in calls if c.status != 200]
    assert len(ok) <= 1 and len(refused) >= 3, calls
    for c in refused:
        body = assert_openai_error(c.r, 429, "spend_guard")
        assert body["type"] == "rate_limit_error"
        assert "1 requests per second" in body["message"]
        assert c.headers["retry-after"] == "1"
    start_of_fresh_second()
    assert call(gw, "g-throttle", BODY).status == 200


def test_alert_only_engages_and_serves_every_request(gw):
    g = run_away(gw, "g-alert")
    assert g["action"] == "alert"
    for _ in range(5):
        assert call(gw, "g-alert", BODY).status == 200
    assert engaged_metric(gw, "g-alert") == 1
    assert usage(gw, "g-none").get("guard") is None
