"""Webhook alerts, the rest of the sources and transports (issue 17; DESIGN.md, "Alerts
and the spend guard"), with the receiver and gateway helpers of test_alerts.py:

* an `https://` receiver whose certificate the gateway trusts (the test CA through
  `SSL_CERT_FILE`, as for upstream providers) gets the `slack` body, signed; one whose
  CA it does not trust gets nothing and the event stays queued (verification is on);
* `spend_velocity` fires once per tenant and hour, only above `min_hourly_usd` for a
  tenant with no history;
* the spend guard sends `guard_engaged` and, on the admin clear, `guard_cleared`;
* `audit_shipping_stalled` is sent once when ClickHouse stays unreachable past the
  stall threshold (lowered to 2 s for the test; 300 s by default).
"""

from __future__ import annotations

import time

import httpx

from certs import make_ca, make_leaf
from conftest import ADMIN_TOKEN, free_ports
from test_alerts import (BODY, FAILURES, KEY, alerts_overrides, assert_signed, metric, nodes,  # noqa: F401
                         receiver, spend, wait_metric)

PER_REQUEST_NANO = 10_000_000


def of_type(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e.get("type") == kind]


def wait_type(rec, kind: str, n: int = 1, deadline_s: float = 20.0) -> list[dict]:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        got = of_type(rec.events(), kind)
        if len(got) >= n:
            return got
        time.sleep(0.1)
    return of_type(rec.events(), kind)


def unbudgeted(hook_url: str, **alerts) -> dict:
    """The alerts tenant with no budgets, so only the source under test raises events."""
    ov = alerts_overrides(hook_url)
    ov["tenants"]["spender"].pop("budget")
    ov["tenants"]["spender"]["api_keys"][0].pop("budget")
    ov["alerts"].update(alerts)
    return ov


def test_https_receiver_gets_the_slack_text_signed(nodes, receiver, mock, tmp_path):
    ca = make_ca(tmp_path / "tls")
    rec = receiver(tls=make_leaf(tmp_path / "tls", "hook")).start()
    ov = alerts_overrides(rec.url)
    ov["alerts"]["webhooks"][0]["format"] = "slack"
    gw = nodes.start("slack", ov, env={"SSL_CERT_FILE": str(ca)})
    spend(gw, 5)  # 50 % of the tenant's month
    rec.wait_for(1)
    time.sleep(2)  # nothing else may follow
    with rec.lock:
        got = list(rec.got)
    assert len(got) == 1, got
    body = rec.events()[0]
    assert list(body) == ["text"], body
    assert "tenant `spender` has used 50 % of its monthly budget: $0.05 of $0.10" in body["text"], body
    assert_signed(rec)


def test_https_receiver_with_an_untrusted_certificate_gets_nothing(nodes, receiver, mock, tmp_path):
    make_ca(tmp_path / "tls")
    rec = receiver(tls=make_leaf(tmp_path / "tls", "hook")).start()
    gw = nodes.start("untrusted", alerts_overrides(rec.url))  # the test CA is not trusted
    spend(gw, 5)
    assert wait_metric(gw, FAILURES, 2) >= 2, gw.log_text()
    assert rec.events() == []
    assert metric(gw, "llmgw_alerts_pending") == 1


def test_spend_velocity_fires_once_an_hour_above_the_minimum(nodes, receiver, mock):
    rec = receiver().start()
    gw = nodes.start("velocity", unbudgeted(rec.url, velocity={"factor": 5, "min_hourly_usd": 0.05}))
    spend(gw, 5)  # exactly $0.05: not above the minimum
    time.sleep(2.5)  # two checks at least
    assert rec.events() == []
    spend(gw, 1)
    got = wait_type(rec, "spend_velocity")
    assert len(got) == 1, rec.events()
    e = got[0]
    assert e["tenant"] == "spender" and e["key_id"] == ""
    assert e["spend_this_hour_nanousd"] == 6 * PER_REQUEST_NANO
    assert e["hourly_avg_nanousd"] == 0 and e["ratio"] == "inf"  # a new tenant: the minimum decides
    assert e["id"].startswith("evt_") and e["at"].endswith("Z")
    spend(gw, 3)  # still this hour: no second event
    time.sleep(2.5)
    assert len(rec.events()) == 1, rec.events()
    assert_signed(rec)
    assert metric(gw, 'llmgw_alerts_sent_total{type="spend_velocity",webhook="hook"}') == 1


def test_guard_engaged_and_cleared_are_sent(nodes, receiver, mock):
    rec = receiver().start()
    ov = unbudgeted(rec.url)
    # Engages past 10 x $0.003 = $0.03: the fourth request.
    ov["tenants"]["spender"]["guard"] = {"velocity_factor": 10, "min_hourly_usd": 0.003, "action": "block"}
    gw = nodes.start("guard", ov)
    spend(gw, 4)
    engaged = wait_type(rec, "guard_engaged")
    assert len(engaged) == 1, rec.events()
    e = engaged[0]
    assert e["tenant"] == "spender" and e["action"] == "block"
    assert e["threshold_nanousd"] == 30_000_000 and e["spend_this_hour_nanousd"] == 4 * PER_REQUEST_NANO
    r = httpx.post(f"{gw.base_url}/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {KEY}"},
                   timeout=10)
    assert r.status_code == 402 and r.json()["error"]["code"] == "spend_guard", r.text
    r = httpx.post(f"{gw.admin_url}/admin/v1/tenants/spender/guard/clear", json={"for_s": 600},
                   headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert r.status_code == 200, r.text
    cleared = wait_type(rec, "guard_cleared")
    assert len(cleared) == 1 and cleared[0]["tenant"] == "spender", rec.events()
    assert [x["type"] for x in rec.events()] == ["guard_engaged", "guard_cleared"]
    assert_signed(rec)


def test_audit_shipping_stalled_is_sent_once(nodes, receiver, mock):
    rec = receiver().start()
    ov = unbudgeted(rec.url)
    closed = free_ports(1)[0]  # ClickHouse unreachable: nothing ships
    ov["audit"] = {"clickhouse": {"url": f"http://127.0.0.1:{closed}", "database": "llm", "table": "llm_audit",
                                  "batch_rows": 10, "flush_ms": 100}}
    gw = nodes.start("stall", ov, env={"LLM_GATEWAY_ALERT_AUDIT_STALL_S": "2"})
    spend(gw, 1)
    got = wait_type(rec, "audit_shipping_stalled")
    assert len(got) == 1, rec.events()
    e = got[0]
    assert e["tenant"] == "" and e["node"], e
    assert e["threshold_s"] == 2 and e["oldest_unshipped_age_s"] > 2, e
    assert e["oldest_unshipped_at"].endswith("Z"), e
    spend(gw, 1)  # the same stall goes on: no second event
    time.sleep(3)
    assert len(of_type(rec.events(), "audit_shipping_stalled")) == 1, rec.events()
    assert_signed(rec)
