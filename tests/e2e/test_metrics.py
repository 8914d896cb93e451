"""`/metrics` on the admin listener: Prometheus text whose counters follow the traffic
and agree with the audit log."""
from __future__ import annotations

import re

import httpx

from helpers import ACME, audit_rows, chat_body, new_request_id, post_chat


def scrape(gw) -> str:
    r = httpx.get(gw.admin_url + "/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


def value(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_counters_follow_requests_and_match_the_audit_cost(gateway):
    # A gateway of its own (distinct overrides), so that only this test's traffic counts.
    gw = gateway({"node": {"region": "us-east-1"}, "tenants": {"metrics-only": {
        "api_keys": [{"id": "m", "sha256": "0" * 64}], "models": ["gpt-4o-mini"]}}})
    rids = [new_request_id("metrics") for _ in range(3)]
    for rid in rids:
        r = post_chat(gw, chat_body("count me [[mock: tokens=5]]"), headers={"x-request-id": rid})
        assert r.status_code == 200, r.text
    bad = new_request_id("metrics-bad")
    r = post_chat(gw, chat_body(model="no-such-model"), headers={"x-request-id": bad})
    assert r.status_code == 400
    # A request is counted when it ends, just before its audit row is queued: once
    # every row is there, every request is in the counters.
    assert audit_rows(gw, bad)
    cost = sum(audit_rows(gw, rid)[0]["cost_nanousd"] for rid in rids)
    text = scrape(gw)
    assert value(text, "llmgw_requests_total", tenant="acme", status="200") == 3
    assert value(text, "llmgw_requests_total", tenant="acme", status="400") == 1
    assert value(text, "llmgw_cost_nanousd_total", tenant="acme") == cost > 0
    assert value(text, "llmgw_tokens_total", tenant="acme", direction="out") == 15
    assert value(text, "llmgw_circuit_state", provider="openai") == 0
    assert re.search(r"^llmgw_ttft_seconds_count\{.*tenant=\"acme\".*\} 3$", text, re.M), text
