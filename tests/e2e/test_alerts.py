"""Webhook alerts (DESIGN.md, "Alerts and the spend guard"): the real gateway binary and
mock provider, and a real HTTP receiver (python http.server on a free loopback port, in
a thread of this process). Checked:

* budget thresholds of a tenant's monthly budget and of a key's hourly budget fire
  exactly once each, at 50/80/100 %, as JSON bodies with the contract's fields and a
  valid `x-gateway-signature`; the alert metrics follow;
* two gateway nodes on one private redis-server, the same tenant spending on both:
  each event arrives exactly once;
* the receiver down (port closed) while the events are raised, the gateway restarted
  in between, then the receiver up: every event still arrives, once;
* a circuit opening and closing sends `circuit_open` then `circuit_closed`;
* a receiver that accepts and never answers costs requests nothing (a loose bound;
  the real proof is a bench: `loadtest/bench.py` against a gateway configured with such
  a webhook, see README "Alerts (webhooks)").

The model `alm` bills output tokens only, and every request asks for exactly as many
tokens as the mock sends, so each request costs exactly its reservation ($0.01) and a
budget of $0.10 is reached to the nano-dollar after 10 requests (zero overshoot means
100 % is reached only when the last request's actual cost equals its worst case).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import (_LOGS, Gateway, _stop, _wait_ready, base_config, deep_merge, free_ports, gateway_env,
                      sha256_hex)

SECRET = "alert-test-secret"
KEY = "sk-alerts-test-key"
PER_REQUEST_NANO = 10_000_000  # 10 output tokens at $1000 per Mtok
BODY = {"model": "alm", "max_tokens": 10,
        "messages": [{"role": "user", "content": "[[mock: tokens=10]] spend"}]}


# --------------------------------------------------------------------------- the receiver


class Receiver:
    """A webhook receiver on `port`: `ok` answers 200, `fail` answers 503 (a receiver
    that is up but down behind its load balancer), `hang` reads the request and never
    answers; over HTTPS when given `tls` (certificate, key). Every request answered 200
    or held open is kept in `got` (headers and exact body bytes); those answered 503 are
    only counted in `failed`. `mode` may be changed while it runs."""

    def __init__(self, port: int | None = None, mode: str = "ok", tls: tuple[Path, Path] | None = None):
        self.port = port or free_ports(1)[0]
        self.mode = mode
        self.tls = tls
        self.got: list[tuple[dict, bytes]] = []
        self.failed = 0
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/hook"

    def start(self) -> "Receiver":
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(n)
                if rec.mode == "fail":
                    with rec.lock:
                        rec.failed += 1
                    self.send_response(503)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                with rec.lock:
                    rec.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                if rec.mode == "hang":
                    rec.release.wait(120)
                    return
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def events(self) -> list[dict]:
        with self.lock:
            return [json.loads(b) for _, b in self.got]

    def wait_for(self, n: int, deadline_s: float = 30.0) -> list[dict]:
        """Polls until at least `n` events arrived or the deadline passes."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            ev = self.events()
            if len(ev) >= n:
                return ev
            time.sleep(0.1)
        return self.events()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(port: int | None = None, mode: str = "ok", tls: tuple[Path, Path] | None = None) -> Receiver:
        r = Receiver(port, mode, tls)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


# --------------------------------------------------------------------------- gateways


def alerts_overrides(hook_url: str, counters: dict | None = None) -> dict:
    return {
        "models": {"alm": {"provider": "inhouse", "price": {"input_per_mtok": 0, "output_per_mtok": 1000},
                           "max_output_tokens": 64}},
        "tenants": {"spender": {
            "api_keys": [{"id": "spender-key", "sha256": sha256_hex(KEY), "budget": {"hourly_usd": 0.2}}],
            "models": ["alm"],
            "budget": {"monthly_usd": 0.1},
        }},
        "counters": counters or {"backend": "memory"},
        "alerts": {
            "webhooks": [{"name": "hook", "url": hook_url, "secret_env": "ALERT_TEST_SECRET", "format": "json"}],
            "budget_thresholds": [0.5, 0.8, 1.0],
        },
    }


class Nodes:
    """Gateway processes this test starts and stops itself (a restart keeps the dir)."""

    def __init__(self, gateway_bin: Path, mock_url: str, tmp: Path):
        self.bin, self.mock_url, self.tmp = gateway_bin, mock_url, tmp
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, overrides: dict, env: dict | None = None, ports: tuple[int, int] | None = None
              ) -> Gateway:
        d = self.tmp / name
        d.mkdir(exist_ok=True)
        http_port, admin_port = ports or free_ports(2)
        cfg = deep_merge(base_config(self.mock_url, http_port, admin_port, d), overrides)
        cfg_path = d / "gateway.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        log_path = self.tmp / f"{name}.log"
        _LOGS[f"alerts-{name}"] = log_path
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [str(self.bin), "serve", "--config", str(cfg_path)], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=d,
                env=gateway_env({"LLM_GATEWAY_PID_FILE": str(d / "llm-gateway.pid"),
                                 "LLM_GATEWAY_UPGRADE_SOCK": str(d / "upgrade.sock"),
                                 "ALERT_TEST_SECRET": SECRET, **(env or {})}))
        self.procs.append(proc)
        gw = Gateway(name=name, base_url=f"http://127.0.0.1:{http_port}", admin_url=f"http://127.0.0.1:{admin_port}",
                     proc=proc, log_path=log_path, config_path=cfg_path, config=cfg)
        _wait_ready(gw)
        return gw

    def stop(self, gw: Gateway) -> None:
        _stop([gw.proc])


@pytest.fixture
def nodes(gateway_bin, mock_provider, tmp_path):
    n = Nodes(gateway_bin, mock_provider.url, tmp_path)
    yield n
    _stop(n.procs)


def spend(gw: Gateway, n: int) -> list[float]:
    """`n` requests of $0.01 each; their durations (s)."""
    took = []
    with httpx.Client(timeout=30) as c:
        for _ in range(n):
            t0 = time.monotonic()
            r = c.post(f"{gw.base_url}/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {KEY}"})
            took.append(time.monotonic() - t0)
            assert r.status_code == 200, r.text
    return took


def periods(events: list[dict]) -> list[tuple[str, str, str]]:
    """(scope, window, threshold) of each budget_threshold event, sorted."""
    return sorted((e["scope"], e["window"], e["threshold"]) for e in events if e["type"] == "budget_threshold")


EXPECTED = sorted([("tenant", "monthly", "0.5"), ("tenant", "monthly", "0.8"), ("tenant", "monthly", "1"),
                   ("key", "hourly", "0.5")])


def assert_signed(rec: Receiver) -> None:
    with rec.lock:
        got = list(rec.got)
    assert got
    for headers, body in got:
        want = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers.get("x-gateway-signature") == want, (headers, body)
        assert headers.get("content-type") == "application/json"


def metric(gw: Gateway, line_start: str) -> float | None:
    text = httpx.get(gw.admin_url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


SENT = 'llmgw_alerts_sent_total{type="budget_threshold",webhook="hook"}'


# --------------------------------------------------------------------------- tests


def test_thresholds_fire_once_each_at_50_80_100_percent_signed(nodes, receiver, mock):
    rec = receiver().start()
    gw = nodes.start("one", alerts_overrides(rec.url))
    # Series exist from start-up.
    assert metric(gw, SENT) == 0
    assert metric(gw, 'llmgw_alert_delivery_failures_total{webhook="hook"}') == 0
    assert metric(gw, "llmgw_alerts_pending") == 0
    assert metric(gw, "llmgw_alerts_dropped_total") == 0

    spend(gw, 4)  # 40 %: nothing yet
    time.sleep(2.5)  # two checks at least
    assert rec.events() == []
    spend(gw, 1)  # 50 %
    first = rec.wait_for(1)
    assert periods(first) == [("tenant", "monthly", "0.5")], first
    spend(gw, 5)  # 100 % of the month, 50 % of the key's hour
    events = rec.wait_for(4)
    time.sleep(3)  # any duplicate would come within a few checks
    events = rec.events()
    assert periods(events) == EXPECTED, events
    assert len({e["id"] for e in events}) == 4
    by = {(e["scope"], e["window"], e["threshold"]): e for e in events}
    top = by[("tenant", "monthly", "1")]
    assert top["tenant"] == "spender" and top["key_id"] == ""
    assert top["spent_nanousd"] == top["budget_nanousd"] == 10 * PER_REQUEST_NANO
    assert top["at"].endswith("Z") and top["id"].startswith("evt_")
    assert list(top)[:5] == ["id", "type", "at", "tenant", "key_id"]
    assert by[("key", "hourly", "0.5")]["key_id"] == "spender-key"
    assert_signed(rec)
    assert metric(gw, SENT) == 4
    assert metric(gw, "llmgw_alerts_pending") == 0


def test_two_nodes_on_redis_deliver_each_event_once(nodes, receiver, mock, tmp_path):
    from test_limits_shared import RedisServer

    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        rec = receiver().start()
        counters = {"backend": "redis", "url": redis.url, "on_error": "fail_closed"}
        a = nodes.start("a", alerts_overrides(rec.url, counters))
        b = nodes.start("b", alerts_overrides(rec.url, counters))
        for _ in range(5):
            spend(a, 1)
            spend(b, 1)
        rec.wait_for(4)
        time.sleep(4)  # both nodes check every second: a duplicate would be here by now
        events = rec.events()
        assert periods(events) == EXPECTED, events
        assert_signed(rec)
        sent = [metric(g, SENT) for g in (a, b)]
        assert sum(sent) == 4, sent
    finally:
        redis.stop()


FAILURES = 'llmgw_alert_delivery_failures_total{webhook="hook"}'
DOWN_S = 60  # the "receiver down for a minute"


def wait_metric(gw: Gateway, name: str, at_least: float, deadline_s: float = 20.0) -> float | None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and (metric(gw, name) or 0) < at_least:
        time.sleep(0.1)
    return metric(gw, name)


def test_receiver_down_for_a_minute_gateway_restarted_in_between_still_delivers(nodes, receiver, mock):
    """The receiver is down for a minute: first nothing listens (connection refused),
    then, after the gateway was restarted, it is up but answers 503. Only then does it
    accept, and every event arrives exactly once. The backoff cap is lowered to 300 ms
    so the last retry comes right after the receiver is back (the real cap is 60 s)."""
    port = free_ports(1)[0]
    env = {"LLM_GATEWAY_ALERT_BACKOFF_MAX_MS": "300"}
    url = Receiver(port).url  # not started: the port is closed
    ports = tuple(free_ports(2))
    down_since = time.monotonic()
    gw = nodes.start("restart", alerts_overrides(url), env=env, ports=ports)
    spend(gw, 10)
    # Raised and queued, not delivered: failures counted, the queue holds them.
    assert wait_metric(gw, "llmgw_alerts_pending", 4) == 4, gw.log_text()
    assert wait_metric(gw, FAILURES, 2) >= 2
    time.sleep(max(0.0, down_since + DOWN_S / 2 - time.monotonic()))  # the outage goes on
    nodes.stop(gw)
    # Memory counters start from zero again: only the spool can bring these events back.
    gw2 = nodes.start("restart", alerts_overrides(url), env=env, ports=ports)
    assert metric(gw2, "llmgw_alerts_pending") == 4
    rec = receiver(port, mode="fail").start()
    assert wait_metric(gw2, FAILURES, 3) >= 3  # 503 is a failure, retried like a refusal
    time.sleep(max(0.0, down_since + DOWN_S - time.monotonic()))
    assert rec.events() == [] and rec.failed >= 3
    assert metric(gw2, "llmgw_alerts_pending") == 4
    rec.mode = "ok"
    rec.wait_for(4)
    time.sleep(2)  # a duplicate would follow within a few retries
    events = rec.events()
    assert periods(events) == EXPECTED, events
    assert_signed(rec)
    end = time.monotonic() + 5
    while time.monotonic() < end and metric(gw2, "llmgw_alerts_pending") != 0:
        time.sleep(0.1)
    assert metric(gw2, "llmgw_alerts_pending") == 0
    assert metric(gw2, SENT) == 4


def test_a_receiver_that_never_answers_costs_requests_nothing(nodes, receiver, mock):
    rec = receiver(mode="hang").start()
    gw = nodes.start("hang", alerts_overrides(rec.url))
    took = spend(gw, 10)  # raises the four events
    # The receiver got a POST (delivery is under way) and holds it open.
    end = time.monotonic() + 15
    while time.monotonic() < end and not rec.got:
        time.sleep(0.1)
    assert rec.got, "no alert reached the receiver"
    more = spend(gw, 0)
    with httpx.Client(timeout=30) as c:
        for _ in range(20):
            t0 = time.monotonic()
            r = c.get(f"{gw.base_url}/v1/models", headers={"authorization": f"Bearer {KEY}"})
            more.append(time.monotonic() - t0)
            assert r.status_code == 200
    # Loose: a blocked request path would take the POST timeout (10 s) per request.
    assert max(took + more) < 2.0, (took, more)
    assert metric(gw, "llmgw_alerts_pending") == 4
    # Requests that spend (settle, the checker's note) while the POST hangs are fine too.
    r = httpx.post(f"{gw.base_url}/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {KEY}"},
                   timeout=5)
    assert r.status_code == 402  # the budget is spent: refused at once, not stuck


def test_circuit_open_and_closed_are_sent(nodes, receiver, mock):
    rec = receiver().start()
    ov = alerts_overrides(rec.url)
    ov["providers"] = {"flaky": {"kind": "openai_compatible", "base_url": f"{mock.url}/flaky", "region": "us-east-1"}}
    ov["models"]["flk"] = {"provider": "flaky", "price": {"input_per_mtok": 0, "output_per_mtok": 0}}
    ov["tenants"]["spender"]["models"] = ["flk"]
    ov["tenants"]["spender"].pop("budget")
    gw = nodes.start("circuit", ov)
    body = {"model": "flk", "messages": [{"role": "user", "content": "hi"}]}
    auth = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=30) as c:
        for _ in range(8):  # five failures in a row open it
            r = c.post(f"{gw.base_url}/v1/chat/completions", json=body, headers={**auth, "x-mock": "status=503"})
            assert r.status_code == 503
        opened = rec.wait_for(1)
        assert [e["type"] for e in opened] == ["circuit_open"], opened
        assert opened[0]["provider"] == "flaky" and opened[0]["tenant"] == ""
        # After the open period a good probe closes it.
        end = time.monotonic() + 20
        while time.monotonic() < end:
            if c.post(f"{gw.base_url}/v1/chat/completions", json=body, headers=auth).status_code == 200:
                break
            time.sleep(0.25)
    events = rec.wait_for(2)
    assert [e["type"] for e in events] == ["circuit_open", "circuit_closed"], events
    assert_signed(rec)


def test_closed_port_is_closed():
    # The restart test relies on a port nobody listens on being refused at once.
    port = free_ports(1)[0]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
