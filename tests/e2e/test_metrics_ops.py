"""`/metrics` for on-call: every family the Grafana dashboard (conf/grafana) queries is
exported and moves with traffic, and label values stay bounded -- random model names and
random API keys never create a label value of their own."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import REPO_ROOT, sha256_hex
from helpers import audit_rows, chat_body, new_request_id, post_chat

DASHBOARD = REPO_ROOT / "conf" / "grafana" / "llm-gateway.json"
SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

KEYS = {"ops-a": "sk-ops-a", "ops-b": "sk-ops-b", "ops-tight": "sk-ops-tight", "ops-broke": "sk-ops-broke"}


def tenant(name: str, **extra) -> dict:
    return {"api_keys": [{"id": f"{name}-key", "sha256": sha256_hex(KEYS[name])}],
            "models": ["gpt-4o-mini", "llama-70b"], **extra}


OVERRIDES = {"tenants": {
    "ops-a": tenant("ops-a", fallback=["llama-70b"], budget={"monthly_usd": 0.05},
                    cache={"enabled": True, "ttl_s": 60}),
    "ops-b": tenant("ops-b"),
    "ops-tight": tenant("ops-tight", rate={"rps": 1}),
    # A budget of 0 (a paused tenant) is a 402; one merely below a request's worst case
    # would be a 400 (it can never fit).
    "ops-broke": tenant("ops-broke", budget={"monthly_usd": 0}),
}}


@pytest.fixture(scope="module")
def gw(gateway):
    return gateway(OVERRIDES)


def scrape(gw) -> list[tuple[str, dict, float]]:
    r = httpx.get(gw.admin_url + "/metrics", timeout=5)
    assert r.status_code == 200
    out = []
    for line in r.text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"unparsable exposition line: {line!r}"
        out.append((m["name"], dict(LABEL.findall(m["labels"] or "")), float(m["value"])))
    return out


def total(samples, name: str, **labels) -> float:
    return sum(v for n, ls, v in samples if n == name and all(ls.get(k) == w for k, w in labels.items()))


def call(gw, who: str, prompt: str, **kw) -> httpx.Response:
    rid = new_request_id("ops")
    r = post_chat(gw, chat_body(prompt, **kw), key=KEYS[who], headers={"x-request-id": rid})
    audit_rows(gw, rid)  # counted when it ended
    return r


def traffic(gw) -> None:
    """Touches every family: success (stream and not), fallback, upstream failure, 429, 402."""
    assert call(gw, "ops-a", "[[mock: tokens=3]]").status_code == 200
    assert call(gw, "ops-a", "[[mock: tokens=4; gap_ms=20]]", stream=True).status_code == 200
    assert call(gw, "ops-b", "[[mock: tokens=2]]", model="llama-70b").status_code == 200
    key = uuid.uuid4().hex
    rid = new_request_id("ops-fallback")
    r = post_chat(gw, chat_body("[[mock: tokens=1]]"), key=KEYS["ops-a"],
                  headers={"x-request-id": rid, "x-mock": f"fail_first=1;key={key}"})
    assert r.status_code == 200 and r.headers.get("x-gateway-fallback") == "true", r.headers
    audit_rows(gw, rid)
    assert call(gw, "ops-b", "[[mock: status=500]]").status_code >= 500
    rids = [new_request_id("ops-tight") for _ in range(3)]
    codes = [post_chat(gw, chat_body("[[mock: tokens=1]]"), key=KEYS["ops-tight"],
                       headers={"x-request-id": rid}).status_code for rid in rids]
    assert 429 in codes, codes
    for rid in rids:
        audit_rows(gw, rid)
    assert call(gw, "ops-broke", "[[mock: tokens=1]]").status_code == 402
    # A cache miss, then its hit.
    cacheable = chat_body(f"[[mock: tokens=2]] cache {uuid.uuid4().hex}", temperature=0)
    results = [post_chat(gw, cacheable, key=KEYS["ops-a"]).headers["x-gateway-cache"] for _ in range(2)]
    assert results == ["miss", "hit"], results


def dashboard_metrics() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dash)
    names = {n for e in exprs for n in re.findall(r"\bllmgw_[a-z0-9_]+", e)}
    assert len(exprs) >= 10 and names, "the dashboard has no Prometheus queries"
    return names


def test_dashboard_is_valid_and_queries_only_exported_metrics(gw, mock):
    traffic(gw)
    exported = {n for n, _, _ in scrape(gw)}
    wanted = dashboard_metrics()
    missing = sorted(wanted - exported)
    assert not missing, f"dashboard queries metrics /metrics does not export: {missing}"
    # The on-call questions each have their series.
    for needed in ("llmgw_spend_velocity_percent", "llmgw_budget_used_ppm", "llmgw_upstream_failures_total",
                   "llmgw_circuit_state", "llmgw_audit_queue_depth", "llmgw_audit_spool_bytes",
                   "llmgw_ttft_seconds_bucket", "llmgw_request_duration_seconds_bucket",
                   "llmgw_rejections_total", "llmgw_inter_token_seconds_bucket",
                   "llmgw_cache_requests_total", "llmgw_audit_oldest_unshipped_age_seconds"):
        assert needed in wanted, f"the dashboard has no panel on {needed}"


def test_metrics_move_with_traffic(gw, mock):
    before = scrape(gw)
    traffic(gw)
    after = scrape(gw)

    def grew(name, **labels):
        assert total(after, name, **labels) > total(before, name, **labels), (name, labels)

    grew("llmgw_requests_total", tenant="ops-a", status="200", provider="openai", model="gpt-4o-mini")
    grew("llmgw_request_duration_seconds_count", tenant="ops-a")
    grew("llmgw_ttft_seconds_count", tenant="ops-a", model="gpt-4o-mini")
    grew("llmgw_inter_token_seconds_count", tenant="ops-a", model="gpt-4o-mini")
    grew("llmgw_tokens_total", tenant="ops-a", direction="out")
    grew("llmgw_cost_nanousd_total", tenant="ops-b", model="llama-70b")
    grew("llmgw_fallbacks_total", tenant="ops-a", model="llama-70b")
    grew("llmgw_upstream_failures_total", provider="openai")
    grew("llmgw_rejections_total", tenant="ops-tight", reason="rate_limited")
    grew("llmgw_rejections_total", tenant="ops-broke", reason="budget_exceeded")
    grew("llmgw_audit_spool_bytes")
    grew("llmgw_spend_this_hour_nanousd", tenant="ops-a")
    assert total(after, "llmgw_budget_used_ppm", tenant="ops-a") > 0
    assert total(after, "llmgw_spend_velocity_percent", tenant="ops-a") >= 0
    # Inter-token time: the mock's 20 ms gap, within a loose bound.
    it_sum = total(after, "llmgw_inter_token_seconds_sum", tenant="ops-a") - \
        total(before, "llmgw_inter_token_seconds_sum", tenant="ops-a")
    it_n = total(after, "llmgw_inter_token_seconds_count", tenant="ops-a") - \
        total(before, "llmgw_inter_token_seconds_count", tenant="ops-a")
    assert 0.005 <= it_sum / it_n <= 0.5, (it_sum, it_n)


def label_values(samples) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for _, ls, _ in samples:
        for k, v in ls.items():
            out.setdefault(k, set()).add(v)
    return out


def test_label_cardinality_is_bounded_under_random_models_and_keys(gw, mock):
    traffic(gw)

    def noise(n: int) -> None:
        for _ in range(n):
            junk = uuid.uuid4().hex
            assert call(gw, "ops-a", "x", model=f"model-{junk}").status_code in (400, 403)
            r = post_chat(gw, chat_body("x", model=f"gpt-{junk}"), key=f"sk-{junk}")
            assert r.status_code == 401
            r = post_chat(gw, chat_body("x"), key=None, headers={"x-api-key": f"sk-other-{junk}",
                                                                 "x-request-id": f"rid-{junk}"})
            assert r.status_code == 401

    noise(5)
    first = scrape(gw)
    noise(25)
    second = scrape(gw)
    series = lambda s: {(n, tuple(sorted(ls.items()))) for n, ls, _ in s}  # noqa: E731
    assert series(second) == series(first), sorted(series(second) - series(first))[:5]

    cfg = gw.config
    allowed = {
        "tenant": set(cfg["tenants"]) | {""},
        "model": set(cfg["models"]) | {""},
        "provider": set(cfg["providers"]) | {""},
    }
    values = label_values(second)
    for label, ok in allowed.items():
        assert values.get(label, set()) <= ok, (label, values[label] - ok)
    text = httpx.get(gw.admin_url + "/metrics").text
    assert "junk" not in text and "sk-" not in text and "model-" not in text
