"""`/metrics` on the admin listener: Prometheus text whose counters follow the traffic
and agree with the audit log."""
from __future__ import annotations

import json
import re

import httpx
import yaml

from conftest import ADMIN_TOKEN
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


ATTEMPT_RESULTS = ["ok", "connect", "first_token_timeout", "idle_timeout", "status_429", "status_5xx",
                   "status_4xx", "reset", "bad_response", "cancelled"]


def attempt_series(text: str) -> dict[tuple[str, str], float]:
    out = {}
    for m in re.finditer(r'^llmgw_upstream_attempts_total\{provider="([^"]+)",result="([^"]+)"\} (\S+)$',
                         text, re.M):
        out[(m[1], m[2])] = float(m[3])
    return out


def test_upstream_attempt_series_exist_at_zero_from_start_and_after_a_reload(gateway):
    # A gateway of its own that nothing has called: every series is still at 0.
    gw = gateway({"node": {"region": "us-east-1"}, "tenants": {"attempts-only": {
        "api_keys": [{"id": "a", "sha256": "1" * 64}], "models": ["gpt-4o-mini"]}}})
    series = attempt_series(scrape(gw))
    for provider in gw.config["providers"]:
        for result in ATTEMPT_RESULTS:
            assert series.get((provider, result)) == 0, (provider, result, series)
    # A provider added by a reload has its series at once too.
    cfg = json.loads(json.dumps(gw.config))
    cfg["providers"]["openai-b"] = dict(cfg["providers"]["openai"])
    gw.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = httpx.post(gw.admin_url + "/admin/v1/reload", headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                   timeout=10)
    assert r.status_code == 200, r.text
    series = attempt_series(scrape(gw))
    assert all(series.get(("openai-b", result)) == 0 for result in ATTEMPT_RESULTS), series
