"""Audit rows shipped to a real ClickHouse (issue 7).

Each test runs its own `clickhouse-server` (Debian's 18.16, see chserver.py) on free
loopback ports and its own gateway processes (they are stopped and restarted on one
spool directory), driven through the official SDKs and raw HTTP:

* mixed requests (ok, stream, Anthropic, models, 401, 400 for a worst case above the
  whole budget, 429, 413, fallback, cache hit) give exactly one row each with the right
  tenant, status, flags, tokens and nano-USD cost;
* ClickHouse down during load, the gateway restarted, ClickHouse back: every row
  arrives, and the documented queries (conf/clickhouse/queries.sql) count each request
  once even when rows were shipped twice;
* a ClickHouse that accepts connections and never answers does not slow requests;
* a torn spool line is skipped with a log line and a metric, the rest ships;
* a graceful stop ships what is waiting instead of waiting for `flush_ms`;
* a graceful upgrade (`serve -u`, SIGQUIT) hands shipping to the new process, no row lost.
* `end_user` comes from `x-gateway-end-user` (wins), OpenAI `user` or Anthropic
  `metadata.user_id`, reaches ClickHouse and the admin audit API; a table and spool lines
  written before the column existed gain it empty, and new rows ship.

Waiting is on readiness signals (rows appearing in ClickHouse or in the spool, metrics,
process exit), with deadlines; never fixed sleeps.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import socket
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from anthropic import Anthropic
from openai import OpenAI

from chserver import ClickHouse, ClickHouseError
from conftest import (ADMIN_TOKEN, TENANT_KEYS, Gateway, _LOGS, _stop, _wait_ready, base_config, deep_merge,
                      free_ports, gateway_env, sha256_hex)
from helpers import chat_body, cost_nanousd, new_request_id

REPO_ROOT = Path(__file__).resolve().parents[2]
QUERIES_SQL = REPO_ROOT / "conf" / "clickhouse" / "queries.sql"

ACME = TENANT_KEYS["acme"]
BROKE, BUSY, FB = "sk-audit-broke", "sk-audit-busy", "sk-audit-fb"
CACHY = "sk-audit-cachy"
MINI_PRICE = {"input_per_mtok": 0.15, "output_per_mtok": 0.60, "cached_input_per_mtok": 0.075}
HAIKU_PRICE = {"input_per_mtok": 0.80, "output_per_mtok": 4.00}
MAX_BODY = 100_000

# The contract's audit schema (shared/DESIGN.md, "Audit row"), in column order.
CONTRACT_COLUMNS = [
    ("request_id", "String"), ("ts", "DateTime"), ("ts_ms", "UInt64"), ("tenant", "String"),
    ("api_key_id", "String"), ("endpoint", "String"), ("model_requested", "String"), ("model", "String"),
    ("provider", "String"), ("region", "String"), ("stream", "UInt8"), ("status", "UInt16"),
    ("error_code", "String"), ("tokens_in", "UInt32"), ("tokens_out", "UInt32"),
    ("cached_tokens_in", "UInt32"), ("usage_estimated", "UInt8"), ("cost_nanousd", "UInt64"),
    ("latency_ms", "UInt32"), ("ttft_ms", "UInt32"), ("cache_hit", "UInt8"), ("fallback_used", "UInt8"),
    ("attempts", "UInt8"), ("node", "String"), ("end_user", "String"),
    ("upstream_model", "String"),
]
# The gateway's CREATE TABLE before `end_user` existed (the columns above but the last),
# for the test that an existing table gains the column.
OLD_DDL = ("CREATE TABLE {db}.llm_audit ("
           + ", ".join(f"{n} {t}" for n, t in CONTRACT_COLUMNS if n not in ("end_user", "upstream_model"))
           + ") ENGINE = ReplacingMergeTree PARTITION BY toYYYYMM(ts) ORDER BY (tenant, ts, request_id, ts_ms, node)")


# --------------------------------------------------------------------------- processes


@pytest.fixture
def clickhouse(tmp_path):
    ch = ClickHouse(tmp_path / "clickhouse")
    _LOGS[f"clickhouse-{tmp_path.name}"] = ch.err_log
    try:
        ch.start()
    except ClickHouseError as e:
        pytest.fail(str(e), pytrace=False)
    yield ch
    ch.stop()


class PrivateGateway:
    """A gateway this test starts, stops and restarts on one spool directory (new
    listener ports at every start)."""

    def __init__(self, gateway_bin: Path, mock_url: str, directory: Path, overrides: dict,
                 env: dict | None = None):
        self.bin, self.mock_url, self.dir, self.overrides = gateway_bin, mock_url, directory, overrides
        self.env = env or {}
        self.dir.mkdir(parents=True, exist_ok=True)
        self.gw: Gateway | None = None
        self.starts = 0

    @property
    def spool(self) -> Path:
        return self.dir / "spool"

    def start(self, upgrade: bool = False) -> Gateway:
        """Starts a gateway; with `upgrade`, one that takes the listeners over from the
        running one (`serve -u`, same config and ports), which is told to hand them over
        (SIGQUIT) and must exit."""
        self.starts += 1
        cfg_path = self.dir / "gateway.yaml"
        old = self.gw
        if upgrade:
            assert old is not None and old.proc.poll() is None
            cfg = old.config
            http_port, admin_port = (int(a.rsplit(":", 1)[1]) for a in (old.base_url, old.admin_url))
        else:
            http_port, admin_port = free_ports(2)
            cfg = deep_merge(base_config(self.mock_url, http_port, admin_port, self.dir), self.overrides)
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        name = f"{self.dir.name}-{self.starts}"
        log_path = self.dir / f"{name}.log"
        _LOGS[name] = log_path
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [str(self.bin), "serve", "--config", str(cfg_path), *(["-u"] if upgrade else [])],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                env=gateway_env({"LLM_GATEWAY_PID_FILE": str(self.dir / "llm-gateway.pid"),
                                 "LLM_GATEWAY_UPGRADE_SOCK": str(self.dir / "upgrade.sock"),
                                 "LLM_GATEWAY_GRACE_PERIOD_S": "1", **self.env}),
            )
        self.gw = Gateway(name=name, base_url=f"http://127.0.0.1:{http_port}",
                          admin_url=f"http://127.0.0.1:{admin_port}", proc=proc, log_path=log_path,
                          config_path=cfg_path, config=cfg)
        if upgrade:
            sock = self.dir / "upgrade.sock"
            wait_for("the new process to wait for the listeners", sock.exists, 15, interval=0.05,
                     log=self.log_text)
            old.proc.send_signal(signal.SIGQUIT)
            try:
                old.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{old.name} did not exit after handing its listeners over:\n{old.log_text()}",
                            pytrace=False)
        _wait_ready(self.gw)
        return self.gw

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (graceful: the queue is flushed) and wait for the exit."""
        gw, self.gw = self.gw, None
        if gw is None or gw.proc.poll() is not None:
            return
        gw.proc.send_signal(signal.SIGTERM)
        try:
            gw.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            gw.proc.kill()
            gw.proc.wait(timeout=10)
            pytest.fail(f"{gw.name} did not exit within {timeout}s of SIGTERM:\n{gw.log_text()}", pytrace=False)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.dir.glob("*.log")))


@pytest.fixture
def private_gateway(gateway_bin, mock_provider, tmp_path):
    made: list[PrivateGateway] = []

    def make(name: str, overrides: dict) -> PrivateGateway:
        g = PrivateGateway(gateway_bin, mock_provider.url, tmp_path / name, overrides)
        made.append(g)
        return g

    yield make
    _stop([g.gw.proc for g in made if g.gw is not None])


def audit_overrides(ch_url: str | None, database: str, batch_rows: int = 50, flush_ms: int = 200,
                    **extra) -> dict:
    audit: dict = {"spool_dir": "spool"}
    if ch_url is not None:
        audit["clickhouse"] = {"url": ch_url, "database": database, "table": "llm_audit",
                               "batch_rows": batch_rows, "flush_ms": flush_ms}
    return {"audit": audit, **extra}


# --------------------------------------------------------------------------- observations


def wait_for(what: str, probe, timeout: float, interval: float = 0.1, log=None):
    """Polls `probe()` until it returns a truthy value; fails with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    extra = f"\n{log()}" if log else ""
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r}){extra}", pytrace=False)


def ch_rows(ch: ClickHouse, db: str, ids: list[str], final: bool = True) -> list[dict]:
    quoted = ",".join("'" + i.replace("'", "\\'") + "'" for i in ids)
    return ch.rows(f"SELECT * FROM llm_audit {'FINAL' if final else ''} WHERE request_id IN ({quoted})"
                   " ORDER BY ts_ms", database=db)


def wait_all_in_clickhouse(ch: ClickHouse, db: str, ids: list[str], timeout: float, log=None) -> list[dict]:
    def probe():
        try:
            rows = ch_rows(ch, db, ids)
        except (ClickHouseError, httpx.HTTPError):
            return None  # the table may not exist yet
        return rows if len({r["request_id"] for r in rows}) == len(set(ids)) else None
    return wait_for(f"{len(set(ids))} rows in ClickHouse", probe, timeout, log=log)


def metric(gw: Gateway, name: str) -> float:
    text = httpx.get(f"{gw.admin_url}/metrics", timeout=5).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"metric {name} missing from /metrics"
    return float(m.group(1))


def spool_rows(spool: Path) -> list[dict]:
    out = []
    for f in sorted(spool.glob("audit-*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def openai_client(gw: Gateway, key: str = ACME) -> OpenAI:
    return OpenAI(base_url=gw.base_url + "/v1", api_key=key, max_retries=0, timeout=15)


def ok_chat(gw: Gateway, prompt: str = "Audit me. [[mock: tokens=5]]") -> tuple[str, int]:
    """One successful chat completion; (request id, its nano-USD cost from the usage)."""
    rid = new_request_id("ok")
    r = openai_client(gw).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}],
        extra_headers={"x-request-id": rid})
    u = r.usage
    return rid, cost_nanousd(MINI_PRICE, u.prompt_tokens, u.completion_tokens, cached_of(u))


def cached_of(usage) -> int:
    details = getattr(usage, "prompt_tokens_details", None)
    return (getattr(details, "cached_tokens", None) or 0) if details else 0


# --------------------------------------------------------------------------- mixed requests


def mixed_overrides(ch_url: str, closed_port: int) -> dict:
    dead = f"http://127.0.0.1:{closed_port}"
    return audit_overrides(
        ch_url, "audit_mixed",
        max_body_bytes=MAX_BODY,
        providers={"dead": {"kind": "openai", "base_url": dead, "api_key_env": "MOCK_OPENAI_KEY",
                            "region": "us-east-1"}},
        models={"dead-model": {"provider": "dead", "price": MINI_PRICE, "max_output_tokens": 4096}},
        tenants={
            "broke": {"api_keys": [{"id": "broke-key", "sha256": sha256_hex(BROKE)}], "models": ["gpt-4o-mini"],
                      "budget": {"monthly_usd": 0.0001}},
            "busy": {"api_keys": [{"id": "busy-key", "sha256": sha256_hex(BUSY)}], "models": ["gpt-4o-mini"],
                     "rate": {"rps": 1}},
            "fb": {"api_keys": [{"id": "fb-key", "sha256": sha256_hex(FB)}],
                   "models": ["dead-model", "gpt-4o-mini"], "fallback": ["gpt-4o-mini"]},
            "cachy": {"api_keys": [{"id": "cachy-key", "sha256": sha256_hex(CACHY)}], "models": ["gpt-4o-mini"],
                      "cache": {"enabled": True, "ttl_s": 600}},
        },
    )


def test_mixed_requests_give_exactly_one_row_each(clickhouse, private_gateway, closed_port):
    pg = private_gateway("mixed", mixed_overrides(clickhouse.url, closed_port))
    gw = pg.start()
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    # request id -> the row we expect (column: value)
    expected: dict[str, dict] = {}

    def raw(path: str, key: str | None, body: bytes | None, rid: str, method: str = "POST") -> httpx.Response:
        h = {"x-request-id": rid, "content-type": "application/json"}
        if key:
            h["authorization"] = f"Bearer {key}"
        return httpx.request(method, gw.base_url + path, headers=h, content=body, timeout=15)

    # ok, non-streamed (openai SDK)
    rid, cost = ok_chat(gw)
    expected[rid] = dict(tenant="acme", api_key_id="acme-test", endpoint="chat_completions", status=200,
                         error_code="", stream=0, model="gpt-4o-mini", provider="openai", fallback_used=0,
                         attempts=1, cache_hit=0, cost_nanousd=cost)

    # ok, streamed with usage (openai SDK)
    rid = new_request_id("stream")
    chunks = list(openai_client(gw).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Stream it. [[mock: tokens=7]]"}], stream=True,
        stream_options={"include_usage": True}, extra_headers={"x-request-id": rid}))
    usage = [c.usage for c in chunks if c.usage][-1]
    expected[rid] = dict(tenant="acme", endpoint="chat_completions", status=200, error_code="", stream=1,
                         model="gpt-4o-mini", fallback_used=0, tokens_in=usage.prompt_tokens,
                         tokens_out=usage.completion_tokens,
                         cost_nanousd=cost_nanousd(MINI_PRICE, usage.prompt_tokens, usage.completion_tokens,
                                                   cached_of(usage)))

    # ok, Anthropic Messages (anthropic SDK)
    rid = new_request_id("msg")
    m = Anthropic(base_url=gw.base_url, api_key=ACME, max_retries=0, timeout=15).messages.create(
        model="claude-haiku", max_tokens=50, messages=[{"role": "user", "content": "Hi [[mock: tokens=3]]"}],
        extra_headers={"x-request-id": rid})
    expected[rid] = dict(tenant="acme", endpoint="messages", status=200, stream=0, model="claude-haiku",
                         provider="anthropic", tokens_in=m.usage.input_tokens, tokens_out=m.usage.output_tokens,
                         cost_nanousd=cost_nanousd(HAIKU_PRICE, m.usage.input_tokens, m.usage.output_tokens))

    # GET /v1/models
    rid = new_request_id("models")
    assert raw("/v1/models", ACME, None, rid, method="GET").status_code == 200
    expected[rid] = dict(tenant="acme", endpoint="models", status=200, cost_nanousd=0)

    # 401: unknown key
    rid = new_request_id("unauth")
    r = raw("/v1/chat/completions", "sk-nobody", json.dumps({"model": "gpt-4o-mini", "messages": []}).encode(), rid)
    assert r.status_code == 401, r.text
    expected[rid] = dict(tenant="", status=401, error_code="invalid_api_key", cost_nanousd=0, tokens_out=0)

    # 400: the worst case is above the whole budget, so it could never fit (not a 402 to retry)
    rid = new_request_id("broke")
    r = raw("/v1/chat/completions", BROKE,
            json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode(), rid)
    assert r.status_code == 400, r.text
    expected[rid] = dict(tenant="broke", status=400, error_code="invalid_request", cost_nanousd=0, tokens_out=0)

    # 429: three requests at once against rps 1 (at most one second boundary falls between them)
    statuses = {}
    for _ in range(3):
        rid = new_request_id("busy")
        r = raw("/v1/chat/completions", BUSY,
                json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}).encode(), rid)
        statuses[rid] = r.status_code
    assert 429 in statuses.values(), statuses
    for rid, status in statuses.items():
        assert status in (200, 429), statuses
        expected[rid] = dict(tenant="busy", status=status, error_code="" if status == 200 else "rate_limited")
        if status == 429:
            expected[rid]["cost_nanousd"] = 0

    # 413: body above max_body_bytes
    rid = new_request_id("big")
    big = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]})
    r = raw("/v1/chat/completions", ACME, big.encode(), rid)
    assert r.status_code == 413, r.text
    expected[rid] = dict(tenant="acme", status=413, error_code="request_too_large", cost_nanousd=0, tokens_out=0)

    # fallback: the first choice's provider refuses connections, gpt-4o-mini serves
    rid = new_request_id("fallback")
    r = openai_client(gw, FB).chat.completions.with_raw_response.create(
        model="dead-model", messages=[{"role": "user", "content": "Fall back [[mock: tokens=4]]"}],
        extra_headers={"x-request-id": rid})
    assert r.headers.get("x-gateway-fallback") == "true", dict(r.headers)
    u = r.parse().usage
    expected[rid] = dict(tenant="fb", status=200, error_code="", model="gpt-4o-mini", model_requested="dead-model",
                         provider="openai", fallback_used=1, attempts=2, tokens_in=u.prompt_tokens,
                         tokens_out=u.completion_tokens,
                         cost_nanousd=cost_nanousd(MINI_PRICE, u.prompt_tokens, u.completion_tokens, cached_of(u)))

    # cache hit: the same deterministic request twice; the second is served from the cache,
    # costs nothing and carries the original usage.
    cacheable = json.dumps({"model": "gpt-4o-mini", "temperature": 0,
                            "messages": [{"role": "user", "content": f"Cache me {rid} [[mock: tokens=5]]"}]}).encode()
    miss_rid, hit_rid = new_request_id("cache-miss"), new_request_id("cache-hit")
    miss = raw("/v1/chat/completions", CACHY, cacheable, miss_rid)
    hit = raw("/v1/chat/completions", CACHY, cacheable, hit_rid)
    assert (miss.headers["x-gateway-cache"], hit.headers["x-gateway-cache"]) == ("miss", "hit")
    mu = miss.json()["usage"]
    miss_cost = cost_nanousd(MINI_PRICE, mu["prompt_tokens"], mu["completion_tokens"])
    expected[miss_rid] = dict(tenant="cachy", status=200, cache_hit=0, provider="openai",
                              tokens_out=mu["completion_tokens"], cost_nanousd=miss_cost)
    expected[hit_rid] = dict(tenant="cachy", status=200, error_code="", cache_hit=1, model="gpt-4o-mini",
                             tokens_in=mu["prompt_tokens"], tokens_out=mu["completion_tokens"], cost_nanousd=0)

    ids = list(expected)
    rows = wait_all_in_clickhouse(clickhouse, "audit_mixed", ids, timeout=30, log=pg.log_text)
    assert len(rows) == len(ids), f"exactly one row per request: {[r['request_id'] for r in rows]}"
    by_id = {r["request_id"]: r for r in rows}
    for rid, want in expected.items():
        got = by_id[rid]
        diff = {k: (got[k], v) for k, v in want.items() if got[k] != v}
        assert not diff, f"row {rid}: (got, expected) {diff}\n{got}"
        assert got["node"] and got["region"] == "us-east-1", got
        assert got["ts_ms"] // 1000 == int(dt.datetime.strptime(got["ts"], "%Y-%m-%d %H:%M:%S")
                                           .replace(tzinfo=dt.timezone.utc).timestamp()), got

    # The table the gateway created has the contract's columns and types.
    desc = clickhouse.rows("DESCRIBE TABLE llm_audit", database="audit_mixed")
    assert [(c["name"], c["type"]) for c in desc] == CONTRACT_COLUMNS

    # The admin audit endpoint answers from ClickHouse.
    r = httpx.get(f"{gw.admin_url}/admin/v1/tenants/acme/audit",
                  params={"since": since.strftime("%Y-%m-%dT%H:%M:%SZ"), "limit": 1000},
                  headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source"] == "clickhouse" and "note" not in body, body
    acme_ids = sorted(rid for rid, w in expected.items() if w["tenant"] == "acme")
    assert sorted(row["request_id"] for row in body["rows"]) == acme_ids
    assert all(isinstance(row["cost_nanousd"], int) for row in body["rows"]), body["rows"][:1]
    assert metric(gw, "llmgw_audit_rows_shipped_total") >= len(ids)


# --------------------------------------------------------------------------- outage and restart


def documented_queries() -> dict[str, str]:
    """conf/clickhouse/queries.sql by `-- name:`, parameters substituted for 18.16."""
    text = QUERIES_SQL.read_text()
    parts = re.split(r"^-- name: (\w+)\n", text, flags=re.M)[1:]
    return {name: body.strip().rstrip(";") for name, body in zip(parts[::2], parts[1::2])}


def run_documented(ch: ClickHouse, db: str, name: str, tenant: str, month: str) -> list[dict]:
    sql = (documented_queries()[name]
           .replace("{tenant:String}", f"'{tenant}'")
           .replace("{month:Date}", f"toDate('{month}')"))
    assert "{" not in sql, f"unsubstituted parameter in {name}: {sql}"
    return ch.rows(sql, database=db)


def test_clickhouse_outage_and_gateway_restart_lose_nothing_and_count_once(clickhouse, private_gateway):
    db = "audit_outage"
    pg = private_gateway("outage", audit_overrides(clickhouse.url, db, batch_rows=10, flush_ms=200))
    gw = pg.start()
    costs: dict[str, int] = {}

    def send(n: int) -> list[str]:
        out = []
        for _ in range(n):
            rid, cost = ok_chat(pg.gw)
            costs[rid] = cost
            out.append(rid)
        return out

    first = send(12)
    wait_all_in_clickhouse(clickhouse, db, first, timeout=30, log=pg.log_text)

    clickhouse.stop()
    during = send(20)  # requests are served while ClickHouse is down
    wait_for("a failed batch", lambda: metric(gw, "llmgw_audit_failed_batches_total") >= 1, 30, log=pg.log_text)
    assert metric(gw, "llmgw_audit_unshipped_bytes") > 0
    wait_for("the oldest unshipped row to age", lambda: metric(gw, "llmgw_audit_oldest_unshipped_age_seconds") >= 1,
             15)

    pg.stop()  # graceful: the queue reaches the spool before exit
    on_disk = {r["request_id"] for r in spool_rows(pg.spool)}
    assert set(during) <= on_disk, "every row of the outage is in the spool"

    gw = pg.start()  # replays the spool from its cursor
    after = send(8)
    clickhouse.start()
    ids = first + during + after
    rows = wait_all_in_clickhouse(clickhouse, db, ids, timeout=90, log=pg.log_text)
    assert len(rows) == len(ids)

    # Ship everything again (as after a crash before the cursor moved): merges are
    # stopped so the duplicates stay on disk, and the documented queries must still
    # count each request once.
    clickhouse.query("SYSTEM STOP MERGES llm_audit", database=db)
    shipped = metric(gw, "llmgw_audit_rows_shipped_total")
    pg.stop()
    (pg.spool / "clickhouse.cursor").unlink()
    gw = pg.start()
    wait_for("the spool shipped again", lambda: metric(gw, "llmgw_audit_rows_shipped_total") >= 1, 30,
             log=pg.log_text)
    raw_count = int(clickhouse.query("SELECT count() FROM llm_audit", database=db))
    assert raw_count > len(ids), f"expected duplicate rows on disk ({raw_count} vs {len(ids)}; shipped {shipped})"
    assert len(ch_rows(clickhouse, db, ids)) == len(ids)

    month = ch_rows(clickhouse, db, ids[:1])[0]["ts"][:7] + "-01"
    bill = run_documented(clickhouse, db, "tenant_monthly_bill", "acme", month)
    assert len(bill) == 1 and bill[0]["requests"] == len(ids), bill
    assert bill[0]["cost_nanousd"] == sum(costs.values()), (bill, sum(costs.values()))
    by_model = run_documented(clickhouse, db, "tenant_spend_by_model", "acme", month)
    assert [(r["model"], r["requests"], r["cost_nanousd"]) for r in by_model] == \
        [("gpt-4o-mini", len(ids), sum(costs.values()))], by_model
    top = run_documented(clickhouse, db, "top_tenants_last_hour", "acme", month)
    assert [(r["tenant"], r["requests"]) for r in top] == [("acme", len(ids))], top
    assert run_documented(clickhouse, db, "tenant_errors_last_hour", "acme", month) == []


# --------------------------------------------------------------------------- hanging server


class HangingServer:
    """Accepts TCP connections, reads whatever comes, never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            self.conns.append(c)
            threading.Thread(target=self._drain, args=(c,), daemon=True).start()

    def _drain(self, c: socket.socket):
        try:
            while not self._stop.is_set() and c.recv(65536):
                pass
        except OSError:
            pass

    def close(self):
        self._stop.set()
        for c in self.conns:
            c.close()
        self.sock.close()


def test_hanging_clickhouse_does_not_slow_requests(private_gateway):
    hang = HangingServer()
    try:
        plain = private_gateway("spool-only", audit_overrides(None, "x")).start()
        hung_pg = private_gateway("hung", audit_overrides(f"http://127.0.0.1:{hang.port}", "audit_hung",
                                                          batch_rows=5, flush_ms=50))
        hung = hung_pg.start()

        def timed(gw: Gateway) -> float:
            t0 = time.perf_counter()
            r = httpx.post(f"{gw.base_url}/v1/chat/completions", timeout=15,
                           headers={"authorization": f"Bearer {ACME}", "content-type": "application/json"},
                           content=json.dumps({"model": "gpt-4o-mini",
                                               "messages": [{"role": "user", "content": "t [[mock: tokens=2]]"}]}))
            assert r.status_code == 200, r.text
            return time.perf_counter() - t0

        for gw in (plain, hung):  # warm-up
            timed(gw)
        # The shipper is stuck on its first insert from here on.
        wait_for("the shipper to connect to the hanging server", lambda: hang.accepted >= 1, 15,
                 log=hung_pg.log_text)
        base, with_hang = [], []
        for _ in range(40):  # interleaved, so machine load hits both alike
            base.append(timed(plain))
            with_hang.append(timed(hung))
        med_base, med_hang = statistics.median(base), statistics.median(with_hang)
        assert med_hang <= 2 * med_base + 0.010, \
            f"median {med_hang * 1000:.1f} ms with a hanging ClickHouse vs {med_base * 1000:.1f} ms spool-only"
        assert max(with_hang) < 2.0, f"a request waited on ClickHouse: max {max(with_hang):.2f}s"

        # Nothing was acknowledged; the rows wait in the spool.
        assert metric(hung, "llmgw_audit_rows_shipped_total") == 0
        assert metric(hung, "llmgw_audit_unshipped_bytes") > 0
        wait_for("41 rows in the spool", lambda: len(spool_rows(hung_pg.spool)) >= 41, 10)

        # The admin query gives up on ClickHouse and answers from the spool, saying so.
        t0 = time.monotonic()
        r = httpx.get(f"{hung.admin_url}/admin/v1/tenants/acme/audit", params={"limit": 1000},
                      headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["source"] == "spool" and "ClickHouse" in body["note"], body
        assert len(body["rows"]) >= 41
        assert time.monotonic() - t0 < 15
    finally:
        hang.close()


# --------------------------------------------------------------------------- torn spool line


def test_torn_spool_line_is_skipped_with_a_log_and_the_rest_ships(clickhouse, private_gateway):
    db = "audit_torn"
    pg = private_gateway("torn", audit_overrides(clickhouse.url, db, batch_rows=50, flush_ms=100))
    pg.start()
    before = [ok_chat(pg.gw)[0] for _ in range(3)]
    wait_all_in_clickhouse(clickhouse, db, before, timeout=30, log=pg.log_text)
    pg.stop()

    # While the gateway is down: a whole row (written but never shipped) and then a
    # torn one, as a crash in the middle of a write leaves it.
    newest = sorted(pg.spool.glob("audit-*.jsonl"))[-1]
    template = json.loads(newest.read_text().splitlines()[-1])
    whole = dict(template, request_id=new_request_id("whole"))
    torn_id = new_request_id("torn")
    torn = json.dumps(dict(template, request_id=torn_id))
    with open(newest, "a") as f:
        f.write(json.dumps(whole) + "\n")
        f.write(torn[: len(torn) // 2])

    gw = pg.start()
    after = [ok_chat(gw)[0] for _ in range(3)]
    rows = wait_all_in_clickhouse(clickhouse, db, before + [whole["request_id"]] + after, timeout=30,
                                  log=pg.log_text)
    assert len(rows) == 7
    assert ch_rows(clickhouse, db, [torn_id]) == []
    wait_for("the corrupt-line metric", lambda: metric(gw, "llmgw_audit_corrupt_lines_total") == 1, 10)
    log = pg.log_text()
    assert "torn line" in log and "skipping a corrupt line" in log, log[-3000:]


# --------------------------------------------------------------------------- graceful stop


def test_graceful_stop_ships_rows_waiting_for_the_flush_interval(clickhouse, private_gateway):
    db = "audit_stop"
    # Batches this big and a minute's flush interval: nothing ships on its own in this test.
    pg = private_gateway("stop", audit_overrides(clickhouse.url, db, batch_rows=10_000, flush_ms=60_000))
    gw = pg.start()
    ids = [ok_chat(gw)[0] for _ in range(5)]
    wait_for("5 rows in the spool", lambda: len(spool_rows(pg.spool)) >= 5, 10)
    wait_for("the shipper to hold them", lambda: metric(gw, "llmgw_audit_oldest_unshipped_age_seconds") >= 1, 10)
    assert metric(gw, "llmgw_audit_rows_shipped_total") == 0
    pg.stop()
    rows = ch_rows(clickhouse, db, ids)
    assert len(rows) == 5, f"rows in ClickHouse after a graceful stop: {len(rows)}\n{pg.log_text()[-3000:]}"


def test_calls_reusing_one_request_id_are_each_billed(clickhouse, private_gateway):
    """A tenant sending many calls with one `x-request-id` at once (a buggy retry loop,
    or someone hoping to be billed once) gets one row per call in `FINAL` queries: the
    node never gives one id the same start millisecond twice."""
    db = "audit_reuse"
    pg = private_gateway("reuse", audit_overrides(clickhouse.url, db, batch_rows=10, flush_ms=100))
    gw = pg.start()
    rid = new_request_id("reused")
    n = 40
    barrier = threading.Barrier(8)

    def burst(_: int) -> list[int]:
        codes = []
        with httpx.Client(timeout=15) as c:
            barrier.wait()
            for _ in range(n // 8):
                r = c.post(f"{gw.base_url}/v1/chat/completions",
                           headers={"authorization": f"Bearer {ACME}", "x-request-id": rid},
                           json=chat_body("[[mock: tokens=2]] again"))
                codes.append(r.status_code)
        return codes

    with ThreadPoolExecutor(8) as pool:
        codes = [c for cs in pool.map(burst, range(8)) for c in cs]
    assert codes == [200] * n, codes
    spooled = [r for r in spool_rows(pg.spool) if r["request_id"] == rid]
    assert len({r["ts_ms"] for r in spooled}) == n, sorted(r["ts_ms"] for r in spooled)

    def billed():
        try:
            got = clickhouse.rows(f"SELECT count() AS n, sum(cost_nanousd) AS c FROM llm_audit FINAL "
                                  f"WHERE request_id = '{rid}'", database=db)
        except (ClickHouseError, httpx.HTTPError):
            return None
        return got if got and int(got[0]["n"]) == n else None
    got = wait_for(f"{n} rows for one reused id in ClickHouse", billed, 30, log=pg.log_text)
    assert int(got[0]["c"]) == n * int(spooled[0]["cost_nanousd"]), got


# --------------------------------------------------------------------------- graceful upgrade


def test_graceful_upgrade_hands_shipping_over_without_loss(clickhouse, private_gateway):
    db = "audit_upgrade"
    pg = private_gateway("upgrade", audit_overrides(clickhouse.url, db, batch_rows=10_000, flush_ms=60_000))
    old = pg.start()
    # Rows the old process holds back (a minute's flush interval) when told to upgrade.
    before = [ok_chat(old)[0] for _ in range(5)]
    wait_for("5 rows in the spool", lambda: len(spool_rows(pg.spool)) >= 5, 10)
    assert metric(old, "llmgw_audit_rows_shipped_total") == 0
    new = pg.start(upgrade=True)
    assert new.proc.poll() is None
    after = [ok_chat(new)[0] for _ in range(5)]
    # The old process shipped its rows on the way out; the new one ships its own when
    # its flush interval is up or it stops.
    assert len(ch_rows(clickhouse, db, before)) == 5, pg.log_text()[-3000:]
    pg.stop()
    rows = ch_rows(clickhouse, db, before + after)
    assert sorted(r["request_id"] for r in rows) == sorted(before + after)


# --------------------------------------------------------------------------- end user


def post(gw: Gateway, path: str, body: dict, rid: str, headers: dict | None = None) -> httpx.Response:
    h = {"authorization": f"Bearer {ACME}", "x-request-id": rid, **(headers or {})}
    return httpx.post(gw.base_url + path, headers=h, json=body, timeout=15)


def test_end_user_lands_in_clickhouse_and_the_admin_api(clickhouse, private_gateway, mock):
    db = "audit_end_user"
    pg = private_gateway("end-user", audit_overrides(clickhouse.url, db, batch_rows=50, flush_ms=100))
    gw = pg.start()
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    chat = chat_body("[[mock: tokens=2]] who am I")
    msgs = {"model": "claude-haiku", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    expected: dict[str, str] = {}  # request id -> end_user

    def send(path: str, body: dict, want: str, headers: dict | None = None, status: int = 200) -> str:
        rid = new_request_id("eu")
        r = post(gw, path, body, rid, headers)
        assert r.status_code == status, r.text
        expected[rid] = want
        return rid

    header_rid = send("/v1/chat/completions", dict(chat, user="body-user"), "header-user",
                      {"x-gateway-end-user": "header-user"})
    send("/v1/chat/completions", dict(chat, user="openai-user@example.com"), "openai-user@example.com")
    send("/v1/messages", dict(msgs, metadata={"user_id": "anthropic-user"}), "anthropic-user")
    send("/v1/messages", dict(msgs, metadata={"user_id": "anthropic-user"}), "header-wins",
         {"x-gateway-end-user": "header-wins"})
    # An Anthropic body's `user` is not its field; an OpenAI body's metadata is not either.
    send("/v1/messages", dict(msgs, user="not-anthropic"), "")
    send("/v1/chat/completions", dict(chat, metadata={"user_id": "not-openai"}), "")
    # Invalid values are ignored (never truncated, never a 400): the next source counts.
    send("/v1/chat/completions", dict(chat, user="fallback-user"), "fallback-user",
         {"x-gateway-end-user": "x" * 129})
    send("/v1/chat/completions", dict(chat, user="y" * 129), "")
    send("/v1/chat/completions", dict(chat, user={"id": 1}), "")
    longest = "z" * 128
    send("/v1/chat/completions", chat, longest, {"x-gateway-end-user": longest})
    send("/v1/chat/completions", chat, "")
    # Refused before the body parsed: the header's end user is still recorded.
    send("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []}, "refused-user",
         {"x-gateway-end-user": "refused-user"}, status=400)

    rows = wait_all_in_clickhouse(clickhouse, db, list(expected), timeout=30, log=pg.log_text)
    got = {r["request_id"]: r["end_user"] for r in rows}
    assert got == expected

    # The header is the gateway's bookkeeping: not sent upstream.
    up = [q for q in mock.requests() if q["headers"].get("x-request-id") == header_rid]
    assert len(up) == 1, up
    assert "x-gateway-end-user" not in up[0]["headers"], up[0]["headers"]

    r = httpx.get(f"{gw.admin_url}/admin/v1/tenants/acme/audit",
                  params={"since": since.strftime("%Y-%m-%dT%H:%M:%SZ"), "limit": 1000},
                  headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source"] == "clickhouse", body
    assert {row["request_id"]: row["end_user"] for row in body["rows"]} == expected

    month = rows[0]["ts"][:7] + "-01"
    by_user = {r["end_user"]: r["requests"]
               for r in run_documented(clickhouse, db, "tenant_spend_by_end_user", "acme", month)}
    assert by_user["header-user"] == 1 and by_user[""] == 5, by_user


def test_a_table_and_spool_from_before_end_user_gain_it_and_new_rows_ship(clickhouse, private_gateway):
    db = "audit_old_table"
    clickhouse.query(f"CREATE DATABASE {db}")
    clickhouse.query(OLD_DDL.format(db=db))
    assert "end_user" not in [c["name"] for c in clickhouse.rows("DESCRIBE TABLE llm_audit", database=db)]
    now_ms = int(time.time() * 1000)
    ts = dt.datetime.fromtimestamp(now_ms // 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    old_in_table = new_request_id("old-table")
    clickhouse.query(f"INSERT INTO llm_audit (request_id, ts, ts_ms, tenant, status) VALUES "
                     f"('{old_in_table}', '{ts}', {now_ms}, 'acme', 200)", database=db)

    pg = private_gateway("old-table", audit_overrides(clickhouse.url, db, batch_rows=50, flush_ms=100))
    # A spool line an earlier version wrote and did not ship: no end_user key.
    pg.spool.mkdir(parents=True)
    old_in_spool = new_request_id("old-spool")
    old_line = {n: (0 if t.startswith("UInt") else "") for n, t in CONTRACT_COLUMNS
                if n not in ("end_user", "upstream_model")}
    old_line.update(request_id=old_in_spool, ts=ts, ts_ms=now_ms, tenant="acme", status=200)
    hour = dt.datetime.fromtimestamp(now_ms // 1000, dt.timezone.utc).strftime("%Y%m%d%H")
    (pg.spool / f"audit-{hour}.jsonl").write_text(json.dumps(old_line) + "\n")

    gw = pg.start()
    new_rid = new_request_id("new")
    r = post(gw, "/v1/chat/completions", chat_body("[[mock: tokens=2]] new"), new_rid,
             {"x-gateway-end-user": "after-upgrade"})
    assert r.status_code == 200, r.text
    rows = wait_all_in_clickhouse(clickhouse, db, [old_in_table, old_in_spool, new_rid], timeout=30,
                                  log=pg.log_text)
    assert {r["request_id"]: r["end_user"] for r in rows} == \
        {old_in_table: "", old_in_spool: "", new_rid: "after-upgrade"}
    desc = clickhouse.rows("DESCRIBE TABLE llm_audit", database=db)
    assert [(c["name"], c["type"]) for c in desc] == CONTRACT_COLUMNS
    assert "added column end_user" in pg.log_text()
    assert "added column upstream_model" in pg.log_text()
    assert {r["request_id"]: r["upstream_model"] for r in rows}[new_rid] != ""

    # A restart finds the column there and adds nothing; shipping goes on.
    pg.stop()
    gw = pg.start()
    again = new_request_id("again")
    assert post(gw, "/v1/chat/completions", chat_body("[[mock: tokens=2]] again"), again,
                {"x-gateway-end-user": "second-start"}).status_code == 200
    rows = wait_all_in_clickhouse(clickhouse, db, [again], timeout=30, log=pg.log_text)
    assert rows[0]["end_user"] == "second-start"
    assert pg.log_text().count("added column end_user") == 1
