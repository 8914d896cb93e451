"""The Prometheus alert rules (conf/prometheus/alerts.yml) are valid, pass their unit
tests (alerts_test.yml, `promtool test rules`), link a section of docs/runbook.md that
exists, and query only metrics (and labels) that the gateway's `/metrics` exports.

promtool comes from `$PROMTOOL`, else `promtool` on PATH, else `.cache/promtool/promtool`
(where tests/run.sh unpacks it from Debian's `prometheus` package without installing
it). Without one the promtool tests skip, except under `CI=true`, where they fail: CI
must run them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import REPO_ROOT, sha256_hex
from helpers import audit_rows, chat_body, new_request_id, post_chat

RULES = REPO_ROOT / "conf" / "prometheus" / "alerts.yml"
RULE_TESTS = REPO_ROOT / "conf" / "prometheus" / "alerts_test.yml"
RUNBOOK = REPO_ROOT / "docs" / "runbook.md"
RUNBOOK_PATH = "docs/runbook.md"

# Metrics the rules may use before the binary exports them, each with why: while such a
# name is missing from /metrics, the metrics test is an xfail (after every other name
# was checked strictly); once it is there it is checked like the others. Add a name
# here only while its metric is being built, and remove it when it has landed.
# (llmgw_spend_guard_engaged was here until the spend guard landed, ee15f2c.)
NOT_YET_EXPORTED: dict[str, str] = {}

# Labels Prometheus adds at scrape time, not the gateway.
SCRAPE_LABELS = {"instance", "job"}

METRIC = re.compile(r"\bllmgw_[a-zA-Z0-9_]+")
SELECTOR = re.compile(r"\b(llmgw_[a-zA-Z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$')
LABEL = re.compile(r'(\w+)="(?:[^"\\]|\\.)*"')


def rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    out = [r for g in doc["groups"] for r in g["rules"]]
    assert out, f"{RULES} has no rules"
    return out


def alert_rules() -> list[dict]:
    return [r for r in rules() if "alert" in r]


# --------------------------------------------------------------------------- promtool


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def find_promtool() -> str | None:
    env = os.environ.get("PROMTOOL")
    if env:
        return env
    on_path = shutil.which("promtool")
    if on_path:
        return on_path
    cached = REPO_ROOT / ".cache" / "promtool" / "promtool"
    if cached.is_file() and os.access(cached, os.X_OK):
        return str(cached)
    return None


@pytest.fixture(scope="module")
def promtool() -> str:
    p = find_promtool()
    if p is None:
        msg = ("promtool not found: set PROMTOOL, put promtool on PATH, or run tests/run.sh "
               "(it unpacks Debian's prometheus package into .cache/promtool/)")
        if in_ci():
            pytest.fail(msg + " -- required under CI=true", pytrace=False)
        pytest.skip(msg)
    if not (os.path.isfile(p) and os.access(p, os.X_OK)):
        pytest.fail(f"PROMTOOL={p} is not an executable file", pytrace=False)
    return p


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_promtool_check_rules(promtool):
    r = run_promtool(promtool, "check", "rules", str(RULES.relative_to(REPO_ROOT)))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert f"SUCCESS: {len(rules())} rules found" in out, out


def test_promtool_test_rules(promtool):
    r = run_promtool(promtool, "test", "rules", str(RULE_TESTS.relative_to(REPO_ROOT)))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "SUCCESS" in out and "FAILED" not in out, out


def test_every_alert_has_a_firing_and_a_quiet_case():
    """alerts_test.yml checks each rule both ways: firing, with its labels and
    annotations, and not firing (below threshold, filtered out, or not for long enough)."""
    doc = yaml.safe_load(RULE_TESTS.read_text())
    assert doc["rule_files"] == [RULES.name]
    fires: set[str] = set()
    quiet: set[str] = set()
    for t in doc["tests"]:
        for case in t.get("alert_rule_test", []):
            name = case["alertname"]
            exp = case.get("exp_alerts") or []
            if exp:
                fires.add(name)
                for a in exp:
                    assert a.get("exp_annotations", {}).get("runbook_url"), \
                        f"{t['name']}: {name} does not check its annotations"
            else:
                quiet.add(name)
    names = {r["alert"] for r in alert_rules()}
    assert names - fires == set(), f"rules never tested firing: {sorted(names - fires)}"
    assert names - quiet == set(), f"rules never tested quiet: {sorted(names - quiet)}"
    unknown = (fires | quiet) - names
    assert not unknown, f"alert tests name rules alerts.yml does not have: {sorted(unknown)}"


# --------------------------------------------------------------------------- runbook links


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped (letters,
    digits, `_`, `-` and spaces kept), each space a `-`."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def runbook_anchors() -> set[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fence = None
    for line in RUNBOOK.read_text().splitlines():
        m = re.match(r"^\s*(```|~~~)", line)
        if m:
            fence = None if fence == m[1] else (fence or m[1])
            continue
        if fence:
            continue
        h = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not h:
            continue
        a = github_anchor(h[1])
        n = seen.get(a, 0)
        seen[a] = n + 1
        anchors.add(a if n == 0 else f"{a}-{n}")
    return anchors


def test_every_rule_links_an_existing_runbook_section():
    assert RUNBOOK.is_file(), f"{RUNBOOK} is missing"
    anchors = runbook_anchors()
    problems = []
    for r in alert_rules():
        url = (r.get("annotations") or {}).get("runbook_url")
        if not url:
            problems.append(f"{r['alert']}: no runbook_url annotation")
            continue
        path, _, anchor = url.partition("#")
        if path != RUNBOOK_PATH or not anchor:
            problems.append(f"{r['alert']}: runbook_url {url!r} is not {RUNBOOK_PATH}#<section>")
        elif anchor not in anchors:
            problems.append(f"{r['alert']}: no heading of {RUNBOOK_PATH} has the anchor #{anchor}")
    assert not problems, "\n".join(problems) + f"\nanchors of the runbook: {sorted(anchors)}"


def test_github_anchor_matches_github():
    assert github_anchor("A tenant jumps from $100/day to $5,000 in one hour") == \
        "a-tenant-jumps-from-100day-to-5000-in-one-hour"
    assert github_anchor("ClickHouse down") == "clickhouse-down"
    assert github_anchor("The `spend_guard` refusal (429/402)") == "the-spend_guard-refusal-429402"


# --------------------------------------------------------------------------- metrics exist


def rule_metrics() -> dict[str, set[str]]:
    """Every llmgw_ metric the rules query -> the labels the rules need it to have (label
    matchers on it, and grouping labels of the expressions it is in)."""
    out: dict[str, set[str]] = {}
    for r in rules():
        expr = r["expr"]
        grouping = {lab.strip() for g in GROUPING.findall(expr) for lab in g.split(",") if lab.strip()}
        for name in METRIC.findall(expr):
            out.setdefault(name, set()).update(grouping - SCRAPE_LABELS)
        for name, matchers in SELECTOR.findall(expr):
            out[name].update(MATCHER.findall(matchers))
    for name, labels in out.items():
        if name.endswith("_bucket"):
            labels.discard("le")  # a histogram's buckets always have it; checked below anyway
    assert out, "the rules query no llmgw_ metric"
    return out


KEYS = {"rules-busy": "sk-rules-busy", "rules-tight": "sk-rules-tight", "rules-guarded": "sk-rules-guarded"}
OVERRIDES = {"tenants": {
    # A monthly budget, so that budget_used_ppm has a series; traffic for requests,
    # TTFT and attempts.
    "rules-busy": {"api_keys": [{"id": "rules-busy-key", "sha256": sha256_hex(KEYS["rules-busy"])}],
                   "models": ["gpt-4o-mini"], "budget": {"monthly_usd": 5}},
    # One request a second, so that a burst is refused as rate_limited.
    "rules-tight": {"api_keys": [{"id": "rules-tight-key", "sha256": sha256_hex(KEYS["rules-tight"])}],
                    "models": ["gpt-4o-mini"], "rate": {"rps": 1}},
    # A spend guard (DESIGN.md `tenants.X.guard`): spend_guard_engaged has series only
    # for guarded tenants.
    "rules-guarded": {"api_keys": [{"id": "rules-guarded-key", "sha256": sha256_hex(KEYS["rules-guarded"])}],
                      "models": ["gpt-4o-mini"],
                      "guard": {"velocity_factor": 10, "min_hourly_usd": 50, "action": "alert"}},
}}


def exported_series(gw) -> dict[str, list[set[str]]]:
    r = httpx.get(gw.admin_url + "/metrics", timeout=5)
    assert r.status_code == 200, r.text
    out: dict[str, list[set[str]]] = {}
    for line in r.text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"unparsable exposition line: {line!r}"
        out.setdefault(m["name"], []).append(set(LABEL.findall(m["labels"] or "")))
    return out


@pytest.fixture(scope="module")
def exported(gateway, mock_provider):
    """The gateway's /metrics after traffic that creates every labelled series the rules
    use: a served request (requests, TTFT, cost), a burst over an rps limit (rejections
    `rate_limited`), a tenant with a budget (budget_used_ppm) and one with a spend guard
    (spend_guard_engaged)."""
    gw = gateway(OVERRIDES)
    rid = new_request_id("rules")
    r = post_chat(gw, chat_body(f"[[mock: tokens=3]] rules {uuid.uuid4().hex}"), key=KEYS["rules-busy"],
                  headers={"x-request-id": rid})
    assert r.status_code == 200, r.text
    audit_rows(gw, rid)  # counted when it ended
    rids = [new_request_id("rules-tight") for _ in range(4)]
    codes = [post_chat(gw, chat_body("[[mock: tokens=1]]"), key=KEYS["rules-tight"],
                       headers={"x-request-id": rid}).status_code for rid in rids]
    assert 429 in codes, codes
    for rid in rids:
        audit_rows(gw, rid)
    return exported_series(gw)


def check_metric(exported: dict[str, list[set[str]]], name: str, labels: set[str]) -> None:
    assert name in exported, f"the rules query {name}, which /metrics does not export"
    have = set().union(*exported[name])
    missing = labels - have
    assert not missing, f"the rules need labels {sorted(missing)} on {name}; it has {sorted(have)}"
    if name.endswith("_bucket"):
        assert "le" in have, f"{name} has no le label"


def test_rules_query_only_exported_metrics(exported):
    wanted = rule_metrics()
    for name in NOT_YET_EXPORTED:
        assert name in wanted, f"NOT_YET_EXPORTED names {name}, which no rule uses: remove it"
    pending = []
    for name, labels in sorted(wanted.items()):
        if name in NOT_YET_EXPORTED and name not in exported:
            pending.append(f"{name}: {NOT_YET_EXPORTED[name]}")
            continue
        check_metric(exported, name, labels)
    if pending:
        pytest.xfail("not exported yet (NOT_YET_EXPORTED): " + "; ".join(pending))
