"""`kill -9` of the gateway under load, then a restart on the same spool.

What is guaranteed (SECURITY.md): a request's audit row is written to the spool (in
the page cache, which outlives the process) before the last bytes of its response,
so every request that got a complete response has its row after a `kill -9`, exactly
once; a line torn by the kill does not stop the restarted gateway (its shipper
repairs or skips it), and the restarted gateway keeps appending.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

from conftest import ADMIN_TOKEN, _stop
from helpers import ACME, audit_rows, chat_body, new_request_id, post_chat
from test_audit_clickhouse import PrivateGateway, metric, spool_rows
from test_limits_shared import RedisServer

# The audit writer is slowed down like a busy disk (each write waits this long), so
# that rows written after their response instead of before would be lost by the kill
# in numbers, not by a rare chance.
SLOW_DISK = {"LLM_GATEWAY_AUDIT_WRITE_DELAY_MS": "30"}

# Concurrent clients of load_then_kill: at most this many requests are cut by the kill.
WORKERS = 4


@pytest.fixture
def crashing(gateway_bin, mock_provider, tmp_path):
    pg = PrivateGateway(gateway_bin, mock_provider.url, tmp_path / "crash", {"audit": {"spool_dir": "spool"}},
                        env=SLOW_DISK)
    yield pg
    if pg.gw is not None:
        _stop([pg.gw.proc])


def load_then_kill(gw, key: str = ACME, model: str = "gpt-4o-mini") -> tuple[list[tuple[str, float]], float]:
    """Four clients keep the gateway busy (streams and not) until at least 300 answers
    and 2 s; then SIGKILL. Returns (request id, answer time) of every 200 and the kill time."""
    answered: list[tuple[str, float]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def load(worker: int) -> None:
        n = 0
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                n += 1
                rid = f"crash-{worker}-{n}-{time.monotonic_ns()}"
                try:
                    r = c.post(f"{gw.base_url}/v1/chat/completions",
                               headers={"authorization": f"Bearer {key}", "x-request-id": rid},
                               json=chat_body("[[mock: tokens=3]] crash", model=model, stream=n % 2 == 0))
                except httpx.HTTPError:
                    continue  # the kill
                if r.status_code == 200:
                    with lock:
                        answered.append((rid, time.monotonic()))

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(WORKERS)]
    for t in threads:
        t.start()
    began = time.monotonic()
    deadline = began + 30
    while (len(answered) < 300 or time.monotonic() < began + 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(answered) >= 300, f"only {len(answered)} answers in 30 s"
    t_kill = time.monotonic()
    gw.proc.kill()
    gw.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(15)
    return answered, t_kill


def restart_and_count(pg, key: str = ACME, model: str = "gpt-4o-mini"):
    """Restarts on the same spool, serves one request, returns (gateway, rows by id)."""
    gw = pg.start()
    rid = new_request_id("after-crash")
    r = post_chat(gw, chat_body("after the crash", model=model), key=key, headers={"x-request-id": rid})
    assert r.status_code == 200, r.text
    audit_rows(gw, rid)
    rows = spool_rows(pg.spool)
    counts = Counter(r.get("request_id") for r in rows)
    twice = {k: v for k, v in counts.items() if v > 1}
    assert not twice, f"rows written more than once: {twice}"
    return gw, {r["request_id"]: r for r in rows}


def test_kill_9_under_load_keeps_the_row_of_every_answered_request_once(crashing):
    answered, _ = load_then_kill(crashing.start())
    _, rows = restart_and_count(crashing)
    lost = [r for r, _ in answered if r not in rows]
    print(f"answered {len(answered)}, rows {len(rows)}, lost {len(lost)}")
    assert not lost, f"{len(lost)} of {len(answered)} answered requests have no row: {lost[:5]}"
    # A request cut by the kill may have its row too (written before its last bytes),
    # but only those in flight: the load's own clients, at most one each.
    ours = {r for r in rows if r.startswith("crash-")}
    assert len(ours) - len(answered) <= WORKERS, (len(ours), len(answered))


def test_kill_9_with_redis_keeps_spend_consistent_with_the_audit(gateway_bin, mock_provider, tmp_path):
    """Spend is settled in Redis before the row is written, and the row before the
    response ends, so after a crash the shared counter holds at least what the spool
    bills (no answered request is unbilled) and at most that plus the requests in
    flight at the kill (settled, row not yet written); a request cut before its settle
    releases its hold, so it costs nothing."""
    redis = RedisServer(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    redis.start()
    pg = PrivateGateway(gateway_bin, mock_provider.url, tmp_path / "crash-redis", {
        "audit": {"spool_dir": "spool"},
        "counters": {"backend": "redis", "url": redis.url, "on_error": "fail_closed"},
        "tenants": {"acme": {"budget": {"monthly_usd": 1000}}},
    }, env=SLOW_DISK)
    try:
        answered, _ = load_then_kill(pg.start())
        gw, rows = restart_and_count(pg)
        acme = [r for r in rows.values() if r["tenant"] == "acme" and r["status"] == 200]
        billed = sum(r["cost_nanousd"] for r in acme)
        per_request = max(r["cost_nanousd"] for r in acme)
        lost = [rid for rid, _ in answered if rid not in rows]
        assert not lost, f"{len(lost)} answered requests have no row: {lost[:5]}"
        with httpx.Client(timeout=10) as c:
            u = c.get(f"{gw.admin_url}/admin/v1/tenants/acme/usage",
                      headers={"authorization": f"Bearer {ADMIN_TOKEN}"}).json()
        spent = u["spent_nanousd"]
        print(f"billed {billed}, spent {spent}, per request {per_request}")
        assert billed <= spent <= billed + WORKERS * per_request, (billed, spent, per_request)
    finally:
        if pg.gw is not None:
            _stop([pg.gw.proc])
        redis.stop()


def test_a_stalled_disk_delays_a_response_by_at_most_the_write_wait(gateway):
    """A response waits for its row, but not for ever: a disk stalled past 2 s lets the
    response go with its row still queued (counted), and the row is written when the
    disk is back."""
    gw = gateway({"node": {"region": "stalled-disk"}}, env={"LLM_GATEWAY_AUDIT_WRITE_DELAY_MS": "4000"})
    rid = new_request_id("stalled")
    before = metric(gw, "llmgw_audit_slow_writes_total")
    t0 = time.monotonic()
    r = post_chat(gw, chat_body("[[mock: tokens=2]] stalled"), headers={"x-request-id": rid})
    took = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert 1.9 <= took < 3.8, took
    assert metric(gw, "llmgw_audit_slow_writes_total") >= before + 1
    assert audit_rows(gw, rid, timeout=15)[0]["status"] == 200
