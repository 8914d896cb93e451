"""Budgets and rate limits on the shared Redis store, and the cheap early refusal.

Every gateway here is the real binary; the Redis ones talk to a private `redis-server`
this module starts on a free loopback port in a temp dir (installed by tests/run.sh;
without it these tests fail, they do not skip). Checked:

* the race: 120 requests released together against a monthly budget that fits 20
  worst cases, on the memory store, on Redis, and on Redis shared by two gateway
  processes: exactly 20 admitted, the rest 402, settled spend <= budget;
* two gateway processes on one Redis enforce one combined rps limit;
* Redis stopped mid-test: `fail_closed` answers 503, `fail_open` serves; once Redis is
  back on the same port both enforce again without a restart, the budget spent before
  the outage still counts (Redis runs with AOF), and what `fail_open` served during
  the outage is added to the shared spend;
* a tenant at its rps or concurrency limit is refused before its body is read (a
  request whose body never finishes arriving still gets its 429 at once), keep-alive
  connections stay usable after such a refusal, and `x-ratelimit-*` headers are on
  every response to a known tenant, errors included.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import free_ports
from helpers import assert_openai_error, audit_rows, chat_body, new_request_id
from limitslib import (PRICE, Call, admin_get, assert_refused_row, call, is_stream_ok, key_of, retry_after,
                       row_of, spend_until_refused, start_of_fresh_second, usage, usd, worst, _tenant)

# --------------------------------------------------------------------------- redis-server


class RedisServer:
    """A private redis-server with AOF (fsync on every write) in its own directory, so
    that it can be stopped and started again on the same port with its data."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not on PATH (tests/run.sh installs it: apt-get install redis-server)",
                        pytrace=False)
        log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 15
        while not self.pings():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server on port {self.port} did not answer PING:\n"
                            f"{(self.dir / 'redis.log').read_text()[-2000:]}", pytrace=False)
            time.sleep(0.02)

    def pings(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(7) == b"+PONG\r\n"
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """Factory: `redis_server()` starts another private Redis; all stop with the module."""
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        r = RedisServer(tmp_path_factory.mktemp("redis"))
        r.start()
        servers.append(r)
        return r

    yield make
    for r in servers:
        r.stop()


# --------------------------------------------------------------------------- config

# The race: 8 tokens 500 ms apart keep every admitted stream in flight until the whole
# burst of 120 has been answered, so exactly the 20 worst cases that fit are admitted.
RACE_N = 120
RACE_FITS = 20
RACE_BODY = chat_body("[[mock: gap_ms=500; tokens=8]] race", model="lim", stream=True, max_tokens=50)
RACE_W = worst(RACE_BODY)[1]
RACE_BUDGET = RACE_FITS * RACE_W + RACE_W // 2

FAST_BODY = chat_body("[[mock: tokens=20]] go", model="lim", max_tokens=50)
FAST_W = worst(FAST_BODY)[1]
SLOW_BODY = chat_body("[[mock: gap_ms=300; tokens=10]] slow", model="lim", stream=True, max_tokens=20)

SHARED_RPS = 10
OUTAGE_BUDGET = 5 * FAST_W + FAST_W // 2

TENANTS = {
    "race-mem": _tenant("race-mem", budget={"monthly_usd": usd(RACE_BUDGET)}),
    "race-redis": _tenant("race-redis", budget={"monthly_usd": usd(RACE_BUDGET)}),
    "race-2n": _tenant("race-2n", budget={"monthly_usd": usd(RACE_BUDGET)}),
    "rps-2n": _tenant("rps-2n", rate={"rps": SHARED_RPS}),
    "flood": _tenant("flood", rate={"rps": 2}),
    "flood-conc": _tenant("flood-conc", rate={"concurrency": 1}),
    "hdrs": _tenant("hdrs", rate={"rps": 1000, "tpm": 1_000_000}, budget={"monthly_usd": 0.01}),
    "out": _tenant("out", rate={"rps": 1000, "concurrency": 50}, budget={"monthly_usd": usd(OUTAGE_BUDGET)}),
}
MODELS = {"lim": {"provider": "inhouse", "price": PRICE, "max_output_tokens": 256}}


def overrides(counters: dict, node: int = 0) -> dict:
    # `max_body_bytes` only tells the gateway factory's processes apart (one per distinct
    # overrides), so that two processes can share one config.
    return {"models": MODELS, "tenants": TENANTS, "counters": counters, "max_body_bytes": 4194304 + node}


@pytest.fixture(scope="module")
def shared_redis(redis_server) -> RedisServer:
    return redis_server()


@pytest.fixture(scope="module")
def gw_mem(gateway):
    return gateway(overrides({"backend": "memory"}))


@pytest.fixture(scope="module")
def gw_redis(gateway, shared_redis):
    """Two gateway processes (two edge nodes) on one Redis."""
    c = {"backend": "redis", "url": shared_redis.url, "on_error": "fail_closed"}
    return gateway(overrides(c, 0)), gateway(overrides(c, 1))


def statuses(calls) -> dict:
    """How many calls ended with each status (and error message), for failure messages."""
    def what(c: Call):
        if c.status == 200:
            return 200
        try:
            return c.status, json.loads(c.body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return c.status, c.body[:200]
    return dict(Counter(what(c) for c in calls))


def rows_of(calls: list[tuple[object, Call]]) -> list[dict]:
    """The audit row of each (gateway, call), from the gateway that served it."""
    return [row_of(gw, c) for gw, c in calls]


# --------------------------------------------------------------------------- 1. the race


@pytest.mark.parametrize("setup", ["memory", "redis", "redis-two-nodes"])
def test_race_of_120_against_a_budget_fitting_20(setup, request, mock):
    if setup == "memory":
        tenant, nodes = "race-mem", [request.getfixturevalue("gw_mem")]
    elif setup == "redis":
        tenant, nodes = "race-redis", [request.getfixturevalue("gw_redis")[0]]
    else:
        tenant, nodes = "race-2n", list(request.getfixturevalue("gw_redis"))
    assert RACE_BUDGET // RACE_W == RACE_FITS
    assert usage(nodes[0], tenant)["spent_nanousd"] == 0

    barrier = threading.Barrier(RACE_N)
    with ThreadPoolExecutor(max_workers=RACE_N) as ex:
        futs = []
        for i in range(RACE_N):
            gw = nodes[i % len(nodes)]
            futs.append((gw, ex.submit(call, gw, tenant, RACE_BODY, rid=new_request_id("race"),
                                       barrier=barrier, warm=True)))
        calls = [(gw, f.result()) for gw, f in futs]

    ok = [c for _, c in calls if c.status == 200]
    refused = [c for _, c in calls if c.status != 200]
    assert refused and ok, [c.status for _, c in calls]
    # Precondition of the exact count: no admitted stream had ended (and settled,
    # freeing room) before the last refusal.
    assert max(c.t_end for c in refused) < min(c.t_end for c in ok), \
        "test timing: a refusal came after an admitted stream had ended; make the streams slower"
    assert len(ok) == RACE_FITS, \
        f"{len(ok)} of {RACE_N} admitted for a budget fitting {RACE_FITS}: {statuses(c for _, c in calls)}"
    for c in refused:
        assert_openai_error(c.r, 402, "budget_exceeded")
    for c in ok:
        assert is_stream_ok(c), c
    if len(nodes) == 2:
        per_node = [sum(1 for gw, c in calls if gw is n and c.status == 200) for n in nodes]
        assert sum(per_node) == RACE_FITS, per_node

    rows = rows_of(calls)
    for (_, c), row in zip(calls, rows):
        if c.status == 402:
            assert_refused_row(row, 402, "budget_exceeded")
        else:
            assert row["status"] == 200 and 0 < row["cost_nanousd"] < RACE_W, row
    spent = sum(r["cost_nanousd"] for r in rows)
    assert spent <= RACE_BUDGET
    assert len([q for q in mock.requests() if q["path"].endswith("/chat/completions")]) == RACE_FITS
    for gw in nodes:  # every node reads the same (shared) counters
        u = usage(gw, tenant)
        assert u["spent_nanousd"] == spent and u["reserved_nanousd"] == 0, u
        assert u["requests"] == RACE_FITS, u


# --------------------------------------------------------------------------- 2. one rps limit, two processes


def test_two_processes_enforce_one_combined_rps_limit(gw_redis, mock):
    """30 requests in one second, 15 to each process, for a tenant allowed 10 a second:
    10 are admitted in total (each process alone would have admitted 10)."""
    n = 3 * SHARED_RPS
    for _ in range(5):
        barrier = threading.Barrier(n)
        start_of_fresh_second()
        second = int(time.time())
        with ThreadPoolExecutor(max_workers=n) as ex:
            futs = [(gw, ex.submit(call, gw, "rps-2n", FAST_BODY, barrier=barrier, warm=True))
                    for i in range(n) for gw in [gw_redis[i % 2]]]
            calls = [(gw, f.result()) for gw, f in futs]
        # Every request must have been admitted or refused in the same UTC second.
        if int(time.time()) == second and all(c.t_end - c.t_head < 0.5 for _, c in calls):
            break
        for gw, c in calls:
            row_of(gw, c)
        time.sleep(1)
    else:
        pytest.skip("could not fit 30 requests into one second on this machine")
    ok = [c for _, c in calls if c.status == 200]
    assert len(ok) == SHARED_RPS, statuses(c for _, c in calls)
    for gw, c in calls:
        if c.status != 200:
            assert_openai_error(c.r, 429, "rate_limited")
            assert retry_after(c) == 1
            assert c.header_int("x-ratelimit-remaining-requests") == 0, c.headers
            assert_refused_row(row_of(gw, c), 429, "rate_limited")
        assert c.header_int("x-ratelimit-limit-requests") == SHARED_RPS, c.headers
    assert sorted(c.header_int("x-ratelimit-remaining-requests") for c in ok) == list(range(SHARED_RPS)), \
        "the remaining-requests headers count down one shared window"


# --------------------------------------------------------------------------- 3. redis goes away and comes back


def metric(gw, name: str) -> float:
    text = httpx.get(f"{gw.admin_url}/metrics", timeout=5).text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def wait_until(what: str, cond, timeout: float = 15.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def test_redis_outage_follows_on_error_and_recovers_without_restart(gateway, redis_server, mock):
    redis = redis_server()
    closed = gateway(overrides({"backend": "redis", "url": redis.url, "on_error": "fail_closed"}, 10))
    opened = gateway(overrides({"backend": "redis", "url": redis.url, "on_error": "fail_open"}, 11))
    pids = (closed.proc.pid, opened.proc.pid)

    # Before: one request through each, spending part of the shared budget.
    before = [(closed, call(closed, "out", FAST_BODY)), (opened, call(opened, "out", FAST_BODY))]
    assert all(c.status == 200 for _, c in before), before
    spent_before = sum(r["cost_nanousd"] for r in rows_of(before))
    assert usage(closed, "out")["spent_nanousd"] == spent_before

    redis.stop()
    errors_at_stop = metric(closed, "llmgw_limits_store_errors")

    # fail_closed: refused at once with 503 and retry-after, never forwarded.
    mock.reset()
    down = call(closed, "out", FAST_BODY)
    assert_openai_error(down.r, 503, "upstream_unavailable")
    assert retry_after(down) >= 1
    assert down.t_end - down.t_head < 1.0
    assert_refused_row(row_of(closed, down), 503, "upstream_unavailable")
    assert mock.requests() == []
    assert admin_get(closed, "/admin/v1/tenants/out/usage").status_code == 503
    assert metric(closed, "llmgw_limits_store_errors") > errors_at_stop

    # fail_open: served (budgets unchecked, spend remembered for later).
    served = [call(opened, "out", FAST_BODY) for _ in range(2)]
    assert all(c.status == 200 for c in served), served
    outage_spent = sum(row_of(opened, c)["cost_nanousd"] for c in served)
    assert metric(opened, "llmgw_limits_store_errors") > 0

    # Redis back on the same port, with its data: both processes notice by themselves.
    redis.start()
    wait_until("the fail_closed gateway to read its counters again",
               lambda: admin_get(closed, "/admin/v1/tenants/out/usage").status_code == 200)
    # The fail_open gateway replays the settles it could not deliver.
    def shared_spend() -> int | None:
        r = admin_get(opened, "/admin/v1/tenants/out/usage")
        return r.json()["spent_nanousd"] if r.status_code == 200 else None

    wait_until("the outage's spend to reach Redis", lambda: shared_spend() == spent_before + outage_spent)
    assert (closed.proc.poll(), opened.proc.poll()) == (None, None)
    assert (closed.proc.pid, opened.proc.pid) == pids

    # Enforcement resumed on the shared spend (before + during the outage): requests go
    # through while the worst case fits, then 402, from either process.
    spend_until_refused([closed, opened], "out", FAST_BODY, lambda: usage(closed, "out")["spent_nanousd"],
                        OUTAGE_BUDGET)
    rows = [r for g in (closed, opened) for r in audit_rows(g) if r.get("tenant") == "out"]
    total = sum(r["cost_nanousd"] for r in rows)
    assert usage(closed, "out")["spent_nanousd"] == total == usage(opened, "out")["spent_nanousd"]


# --------------------------------------------------------------------------- 4. refused before the body is read


def raw_request(tenant_key: str | None, body_len: int, body: bytes, extra: str = "",
                path: str = "/v1/chat/completions") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {body_len}\r\n"
    if tenant_key:
        head += f"authorization: Bearer {tenant_key}\r\n"
    return (head + extra + "\r\n").encode() + body


def read_response(s: socket.socket, buf: bytearray) -> tuple[int, dict, bytes]:
    """One response with a Content-Length body from `s` (leftover bytes stay in `buf`)."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before a response header: {bytes(buf)!r}"
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    lines = bytes(buf[:end]).decode().split("\r\n")
    del buf[:end + 4]
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(buf) < n:
        chunk = s.recv(65536)
        assert chunk, "connection closed inside a response body"
        buf += chunk
    body = bytes(buf[:n])
    del buf[:n]
    return status, headers, body


def connect(gw) -> socket.socket:
    host, port = gw.base_url.removeprefix("http://").rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    return s


def exhaust_rps(gw, tenant: str, rps: int) -> int:
    """Uses up this second's requests; returns the second (a fresh one, with room left)."""
    start_of_fresh_second()
    second = int(time.time())
    for _ in range(rps):
        assert call(gw, tenant, FAST_BODY).status == 200
    return second


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_tenant_over_its_rps_is_refused_before_its_body_is_read(backend, request):
    gw = request.getfixturevalue("gw_mem") if backend == "memory" else request.getfixturevalue("gw_redis")[0]
    for _ in range(3):
        second = exhaust_rps(gw, "flood", 2)
        with connect(gw) as s:
            # 100 kB announced, 10 bytes sent, the rest never: reading the body would wait.
            s.sendall(raw_request(key_of("flood"), 100_000, b'{"model":', "x-request-id: early-rps-1\r\n"))
            t0 = time.monotonic()
            status, headers, body = read_response(s, bytearray())
            took = time.monotonic() - t0
        if int(time.time()) == second:
            break
    else:
        pytest.skip("could not fit three requests into one second")
    assert status == 429, (status, body)
    assert took < 2.0, took
    assert b'"code":"rate_limited"' in body.replace(b" ", b""), body
    assert headers["retry-after"] == "1", headers
    assert headers["x-ratelimit-limit-requests"] == "2" and headers["x-ratelimit-remaining-requests"] == "0", headers
    row = audit_rows(gw, "early-rps-1")[0]
    assert_refused_row(row, 429, "rate_limited")
    assert row["tenant"] == "flood" and row["model_requested"] == "", row


def test_tenant_at_its_concurrency_is_refused_before_its_body_is_read(gw_mem):
    head = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as ex:
        slow = ex.submit(call, gw_mem, "flood-conc", SLOW_BODY, on_head=head)
        assert head.wait(10)
        with connect(gw_mem) as s:
            s.sendall(raw_request(key_of("flood-conc"), 50_000, b"not json either"))
            status, headers, body = read_response(s, bytearray())
        t_refused = time.monotonic()
        long = slow.result()
    assert t_refused < long.t_end, "test timing: the slow stream ended too early"
    assert is_stream_ok(long), long
    assert status == 429 and b"concurrent" in body, (status, body)
    assert headers["retry-after"] == "1"


def test_unknown_key_is_refused_before_its_body_is_read(gw_mem):
    with connect(gw_mem) as s:
        s.sendall(raw_request("sk-nobody", 100_000, b"{"))
        status, _, body = read_response(s, bytearray())
    assert status == 401 and b"invalid_api_key" in body, (status, body)


def test_keep_alive_connection_stays_usable_after_an_early_refusal(gw_mem):
    """The refused request's body is read and dropped after the answer, so the same
    connection carries the next request; a client waiting for `100 Continue` gets its
    answer and a closed connection, not a hang."""
    second = exhaust_rps(gw_mem, "flood", 2)
    junk = b'{"messages": "' + b"x" * 30_000 + b'"}'
    buf = bytearray()
    with connect(gw_mem) as s:
        s.sendall(raw_request(key_of("flood"), len(junk), junk))
        status, headers, _ = read_response(s, buf)
        refused_in_time = int(time.time()) == second
        body = chat_body("[[mock: tokens=3]] after", model="lim", max_tokens=5)
        data = json.dumps(body).encode()
        s.sendall(raw_request(key_of("hdrs"), len(data), data))
        status2, _, body2 = read_response(s, buf)
    if refused_in_time:
        assert status == 429, status
    assert headers.get("connection", "").lower() != "close", headers
    assert status2 == 200 and b"chat.completion" in body2, (status2, body2[:300])

    with connect(gw_mem) as s:
        second = exhaust_rps(gw_mem, "flood", 2)
        s.sendall(raw_request(key_of("flood"), 200_000, b"", "expect: 100-continue\r\n"))
        buf = bytearray()
        status, _, _ = read_response(s, buf)
        s.settimeout(5)
        rest = s.recv(100)   # the connection is closed: no hang waiting for a body
    if int(time.time()) == second:
        assert status == 429
    assert rest == b"" and not buf


# --------------------------------------------------------------------------- 5. headers on every response


def test_ratelimit_headers_on_every_response_to_a_known_tenant(gw_mem):
    key = {"authorization": f"Bearer {key_of('hdrs')}"}
    with httpx.Client(timeout=10) as c:
        cases = {
            "models": c.get(f"{gw_mem.base_url}/v1/models", headers=key),
            "400": c.post(f"{gw_mem.base_url}/v1/chat/completions", headers=key, content=b"{not json"),
            "403": c.post(f"{gw_mem.base_url}/v1/chat/completions", headers=key,
                          json=chat_body("hi", model="gpt-4o-mini")),
            "400 never fits": c.post(f"{gw_mem.base_url}/v1/chat/completions", headers=key,
                                     json=chat_body("hi", model="lim", max_tokens=100_000)),
            "200": c.post(f"{gw_mem.base_url}/v1/chat/completions", headers=key, json=FAST_BODY),
        }
    assert [r.status_code for r in cases.values()] == [200, 400, 403, 400, 200], \
        {k: (r.status_code, r.text[:200]) for k, r in cases.items()}
    for what, r in cases.items():
        assert r.headers.get("x-ratelimit-limit-requests") == "1000", (what, r.headers)
        rem = r.headers.get("x-ratelimit-remaining-requests")
        tok = r.headers.get("x-ratelimit-remaining-tokens")
        assert rem is not None and 0 <= int(rem) <= 1000, (what, r.headers)
        assert tok is not None and 0 <= int(tok) <= 1_000_000, (what, r.headers)
