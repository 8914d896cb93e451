"""Several deployments per model (issue 16): balance, cooldowns from `retry-after`, quotas
shared by two nodes on Redis, and what the client and the audit row see.

Each deployment is its own mock-provider process, so one can be made to refuse (its
`/_mock/defaults`) while the others answer, and each one's request log says exactly what
reached it. Cooldowns and quotas are per `provider/upstream_model`, so every test uses
upstream model names of its own and parks nothing another test uses.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import ADMIN_TOKEN, sha256_hex, start_mock
from helpers import audit_rows, chat_body, new_request_id, post_chat
from test_limits_shared import RedisServer

KEY = "sk-deployments-test"
PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
TIMEOUTS = {"connect_ms": 500, "first_token_ms": 3000, "idle_ms": 5000, "total_ms": 10000}
MAX_COOLDOWN_MS = 300_000


@pytest.fixture(scope="module")
def mocks(gateway_bin, tmp_path_factory):
    d = tmp_path_factory.mktemp("dep-mocks")
    ms = [start_mock(gateway_bin, d / f"mock-{n}.log") for n in "abc"]
    yield ms
    for m in ms:
        m.proc.terminate()
        m.proc.wait(10)


def model(*deps: dict, balance: str = "least_busy") -> dict:
    return {"deployments": list(deps), "balance": balance, "price": PRICE}


def overrides(mocks, counters: dict, node: int) -> dict:
    providers = {f"d{n}": {"kind": "openai_compatible", "base_url": m.url, "region": "us-east-1",
                           "timeouts": TIMEOUTS} for n, m in zip("abc", mocks)}
    models = {
        "pool-weighted": model({"provider": "da", "upstream_model": "w-a", "weight": 3},
                               {"provider": "db", "upstream_model": "w-b", "weight": 1}, balance="weighted"),
        "pool-busy": model({"provider": "da", "upstream_model": "lb-a"},
                           {"provider": "db", "upstream_model": "lb-b"}),
        "pool-cool": model({"provider": "da", "upstream_model": "cd-a", "weight": 2},
                           {"provider": "db", "upstream_model": "cd-b"}),
        "pool-down": model({"provider": "da", "upstream_model": "dn-a", "weight": 2},
                           {"provider": "db", "upstream_model": "dn-b"}),
        "pool-rpm": model({"provider": "da", "upstream_model": "rpm-a", "weight": 2, "rpm": 10},
                          {"provider": "db", "upstream_model": "rpm-b"}),
        "pool-cap": model({"provider": "dc", "upstream_model": "cap-c"}),
    }
    return {
        "providers": providers,
        "models": models,
        "tenants": {"deps": {"api_keys": [{"id": "deps-key", "sha256": sha256_hex(KEY)}],
                             "models": list(models)}},
        "counters": counters,
        # Only tells the factory's processes apart, so two nodes can share one config.
        "max_body_bytes": 4194304 + node,
    }


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    r = RedisServer(tmp_path_factory.mktemp("dep-redis"))
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def nodes(gateway, mocks, redis):
    """Two edge nodes sharing one Redis for their counters."""
    c = {"backend": "redis", "url": redis.url, "on_error": "fail_closed"}
    return gateway(overrides(mocks, c, 0)), gateway(overrides(mocks, c, 1))


@pytest.fixture
def clean(mocks):
    for m in mocks:
        m.reset()
    yield mocks
    for m in mocks:
        m.reset()


def set_defaults(m, directives: str) -> None:
    httpx.post(f"{m.url}/_mock/defaults", content=directives, timeout=5).raise_for_status()


def seen(m, upstream_model: str) -> int:
    return sum(1 for q in m.requests() if q.get("model") == upstream_model)


def chat(gw, model_name: str, prompt: str = "[[mock: tokens=2]] hi", **kw) -> httpx.Response:
    rid = new_request_id("dep")
    return post_chat(gw, chat_body(prompt, model=model_name, **kw), key=KEY,
                     headers={"x-request-id": rid})


def deployment_view(gw, key: str) -> dict:
    r = httpx.get(f"{gw.admin_url}/admin/v1/providers", timeout=5,
                  headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    r.raise_for_status()
    return next(d for d in r.json()["deployments"] if d["key"] == key)


def test_weights_are_honoured_over_1000_requests(nodes, clean):
    a, b, _ = clean
    gw = nodes[0]
    with ThreadPoolExecutor(max_workers=8) as ex:
        rs = list(ex.map(lambda _: chat(gw, "pool-weighted"), range(1000)))
    assert [r.status_code for r in rs] == [200] * 1000
    said = [r.headers["x-gateway-provider"] for r in rs]
    # The mocks' own counts (their logs keep only the last 200 requests).
    to_a, to_b = a.stats()["requests"], b.stats()["requests"]
    assert (to_a, to_b) == (said.count("da"), said.count("db"))
    assert to_a + to_b == 1000
    # 3:1 is 750; a binomial's standard deviation here is under 14, so 4 % is > 2.8 sigma.
    assert abs(to_a - 750) <= 40, (to_a, to_b)


def test_least_busy_prefers_the_idle_deployment(nodes, clean):
    a, b, _ = clean
    gw = nodes[0]
    slow: dict = {}
    t = threading.Thread(target=lambda: slow.setdefault(
        "r", chat(gw, "pool-busy", "[[mock: ttft_ms=1500; tokens=2]] slow")))
    t.start()
    deadline = time.monotonic() + 3
    while seen(a, "lb-a") < 1:  # the first goes to lb-a: equal weights, first listed
        assert time.monotonic() < deadline, "the slow request never reached deployment a"
        time.sleep(0.02)
    quick = [chat(gw, "pool-busy") for _ in range(5)]
    assert [r.status_code for r in quick] == [200] * 5
    assert [r.headers["x-gateway-provider"] for r in quick] == ["db"] * 5
    t.join()
    assert slow["r"].status_code == 200
    assert (seen(a, "lb-a"), seen(b, "lb-b")) == (1, 5)
    # Idle again: back to the first listed.
    assert chat(gw, "pool-busy").headers["x-gateway-provider"] == "da"


def test_a_429_with_retry_after_parks_the_deployment_on_both_nodes(nodes, clean):
    a, b, _ = clean
    n1, n2 = nodes
    set_defaults(a, "status=429;retry_after=3")
    rid = new_request_id("cool")
    r = post_chat(n1, chat_body("[[mock: tokens=2]] hi", model="pool-cool"), key=KEY,
                  headers={"x-request-id": rid})
    parked_at = time.monotonic()
    assert r.status_code == 200, r.text
    assert (r.headers["x-gateway-provider"], r.headers["x-gateway-attempts"],
            r.headers["x-gateway-fallback"]) == ("db", "2", "false")
    row = audit_rows(n1, rid)[0]
    assert (row["model"], row["provider"], row["upstream_model"], row["fallback_used"], row["attempts"]) == \
        ("pool-cool", "db", "cd-b", 0, 2)
    # The other node learns of it through Redis within its poll (250 ms).
    time.sleep(0.5)
    set_defaults(a, "")  # a is healthy again, but asked for 3 s
    view = deployment_view(n2, "da/cd-a")
    assert view["cooldown_until"] is not None, view
    assert 0 < view["cooldown_remaining_ms"] <= 3000, view
    served = []
    while time.monotonic() - parked_at < 2.5:
        for gw in nodes:
            r = chat(gw, "pool-cool")
            assert r.status_code == 200, r.text
            served.append((r.headers["x-gateway-provider"], r.headers["x-gateway-attempts"]))
        time.sleep(0.05)
    assert served and set(served) == {("db", "1")}, set(served)
    assert seen(a, "cd-a") == 1, "a parked deployment is skipped, not tried"
    # Not longer than asked: both nodes use it again once the 3 s are over.
    while time.monotonic() - parked_at < 3.6:
        time.sleep(0.05)
    for gw in nodes:
        assert chat(gw, "pool-cool").headers["x-gateway-provider"] == "da"
    assert seen(a, "cd-a") == 3


def test_a_cooldown_is_capped(nodes, clean):
    _, _, c = clean
    set_defaults(c, "status=429;retry_after=86400")
    r = chat(nodes[0], "pool-cap")
    assert r.status_code == 503
    view = deployment_view(nodes[0], "dc/cap-c")
    assert 0 < view["cooldown_remaining_ms"] <= MAX_COOLDOWN_MS, view
    assert int(r.headers["retry-after"]) <= MAX_COOLDOWN_MS // 1000


def test_all_deployments_down_answers_503_with_the_soonest_retry_after(nodes, clean):
    a, b, _ = clean
    set_defaults(a, "status=429;retry_after=6")
    set_defaults(b, "status=503;retry_after=2")
    r = chat(nodes[0], "pool-down")
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "upstream_unavailable"
    assert r.headers["x-gateway-attempts"] == "2"
    assert r.headers["retry-after"] == "2"
    # Both parked: refused at once, nothing goes upstream, the soonest is still b's.
    r = chat(nodes[0], "pool-down")
    assert r.status_code == 503
    assert r.headers["x-gateway-attempts"] == "0"
    assert 1 <= int(r.headers["retry-after"]) <= 2
    assert (seen(a, "dn-a"), seen(b, "dn-b")) == (1, 1)


def test_a_deployment_s_rpm_holds_across_two_nodes(nodes, clean):
    a, b, _ = clean
    # Keep the 30 requests inside one UTC minute.
    if 60 - time.time() % 60 < 15:
        time.sleep(60 - time.time() % 60 + 0.2)
    with ThreadPoolExecutor(max_workers=6) as ex:
        rs = list(ex.map(lambda i: chat(nodes[i % 2], "pool-rpm"), range(30)))
    assert [r.status_code for r in rs] == [200] * 30
    assert seen(a, "rpm-a") == 10, "never more than rpm upstream requests in a minute, all nodes together"
    assert seen(b, "rpm-b") == 20
    assert {r.headers["x-gateway-attempts"] for r in rs} == {"1"}, "a deployment at its quota is skipped"
    for gw in nodes:
        assert deployment_view(gw, "da/rpm-a")["requests_this_minute"] == 10
