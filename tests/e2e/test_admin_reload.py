"""The admin listener: open health/readiness/metrics, bearer-token auth on /admin/*,
and hot reload (admin API and SIGHUP): a lowered limit applies to new requests while a
stream that started before the reload finishes; an invalid file is refused."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from conftest import ADMIN_TOKEN, free_ports, sha256_hex
from helpers import assert_openai_error, chat_body, post_chat

KEY = "sk-reload-tenant"
NEW_KEY = "sk-added-by-reload"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def tenant(key: str, **extra) -> dict:
    return {"api_keys": [{"id": f"{key}-id", "sha256": sha256_hex(key)}], "models": ["gpt-4o-mini"], **extra}


@pytest.fixture
def gw(gateway, request):
    # A gateway of its own per test (distinct overrides): these tests rewrite its file.
    return gateway({"tenants": {f"reload-{request.node.name[:40]}": tenant(KEY, rate={"concurrency": 8})}})


def rewrite(gw, mutate) -> dict:
    cfg = json.loads(json.dumps(gw.config))
    mutate(cfg)
    gw.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def reload(gw, headers=ADMIN) -> httpx.Response:
    return httpx.post(gw.admin_url + "/admin/v1/reload", headers=headers, timeout=10)


def the_tenant(cfg: dict) -> dict:
    return next(t for n, t in cfg["tenants"].items() if n.startswith("reload-"))


class Stream:
    """A slow streamed chat request in a thread; `head` is set once its headers arrived."""

    def __init__(self, gw, prompt: str):
        self.head = threading.Event()
        self.status = 0
        self.datas: list[str] = []
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._run, args=(gw, prompt), daemon=True)
        self._t.start()

    def _run(self, gw, prompt):
        try:
            with httpx.Client(timeout=20) as c:
                with c.stream("POST", gw.base_url + "/v1/chat/completions",
                              headers={"authorization": f"Bearer {KEY}"},
                              json=chat_body(prompt, stream=True)) as r:
                    self.status = r.status_code
                    self.head.set()
                    for line in r.iter_lines():
                        if line.startswith("data:"):
                            self.datas.append(line[5:].strip())
        except BaseException as e:  # noqa: BLE001 -- reported by the test
            self.error = e
        finally:
            self.head.set()

    def join(self) -> "Stream":
        self._t.join(30)
        assert not self._t.is_alive(), "stream did not finish"
        return self

    def done(self) -> bool:
        return not self._t.is_alive()


# --------------------------------------------------------------------------- open endpoints and auth


def test_health_readiness_and_metrics_are_open(gateway):
    gw = gateway()
    assert httpx.get(gw.admin_url + "/healthz").status_code == 200
    r = httpx.get(gw.admin_url + "/readyz")
    assert r.status_code == 200, r.text
    assert r.text.startswith("ready\n") and "counters: ok (memory)" in r.text, r.text
    assert f"listener {gw.base_url.removeprefix('http://')}: ok" in r.text, r.text
    assert httpx.get(gw.admin_url + "/metrics").status_code == 200


@pytest.mark.parametrize("headers", [
    {},
    {"authorization": "Bearer wrong-token"},
    {"authorization": f"Bearer {ADMIN_TOKEN}x"},
    {"authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
    {"authorization": f"Basic {ADMIN_TOKEN}"},
    {"authorization": "Bearer sk-acme-test"},
])
def test_admin_api_needs_the_admin_token(gateway, headers):
    gw = gateway()
    for method, path in [("GET", "/admin/v1/providers"), ("GET", "/admin/v1/tenants/acme/usage"),
                         ("POST", "/admin/v1/reload")]:
        r = httpx.request(method, gw.admin_url + path, headers=headers)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["message"]
    ok = httpx.get(gw.admin_url + "/admin/v1/providers", headers=ADMIN)
    assert ok.status_code == 200 and ok.json()["providers"], ok.text


def test_admin_api_is_closed_when_no_token_is_configured(gateway):
    gw = gateway({"admin": {"token_env": "LLM_GATEWAY_TEST_NO_SUCH_TOKEN_VAR"}})
    r = httpx.get(gw.admin_url + "/admin/v1/providers", headers=ADMIN)
    assert r.status_code == 401
    assert httpx.get(gw.admin_url + "/healthz").status_code == 200


# --------------------------------------------------------------------------- reload


def test_reload_lowers_a_limit_without_dropping_the_stream_in_flight(gw, mock):
    stream = Stream(gw, "long answer [[mock: gap_ms=200; tokens=10]]")
    assert stream.head.wait(10) and stream.status == 200, stream.error
    # Under the old limit (concurrency 8) a second request is admitted next to the stream.
    r = post_chat(gw, chat_body("side [[mock: tokens=1]]"), key=KEY)
    assert r.status_code == 200, r.text

    rewrite(gw, lambda c: the_tenant(c).update(rate={"concurrency": 1}))
    r = reload(gw)
    assert r.status_code == 200, r.text
    assert r.json()["reloaded"] is True and r.json()["needs_restart"] == []

    # The new limit holds at once: the stream still occupies the only slot.
    refused = post_chat(gw, chat_body("side [[mock: tokens=1]]"), key=KEY)
    assert not stream.done(), "test timing: the stream ended before the reload was checked"
    assert_openai_error(refused, 429, "rate_limited")

    stream.join()
    assert stream.error is None, stream.error
    assert stream.datas[-1] == "[DONE]", stream.datas[-3:]
    tokens = [d for d in stream.datas[:-1] if json.loads(d).get("choices") and
              json.loads(d)["choices"][0]["delta"].get("content")]
    assert len(tokens) == 10, stream.datas
    # With the slot free again, a request fits the lowered limit.
    assert post_chat(gw, chat_body("after [[mock: tokens=1]]"), key=KEY).status_code == 200


def test_invalid_reload_is_refused_and_the_old_config_keeps_serving(gw, mock):
    good = gw.config_path.read_text()
    rewrite(gw, lambda c: the_tenant(c).update(rate={"concurrency": 1, "rpz": 5}))
    r = reload(gw)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["reloaded"] is False
    assert "rate" in body["error"] and "rpz" in body["error"], body

    gw.config_path.write_text("tenants: [this is: not: yaml")
    r = reload(gw)
    assert r.status_code == 400 and r.json()["reloaded"] is False, r.text

    # Still the old config: concurrency 8 lets two requests run side by side.
    with ThreadPoolExecutor(2) as ex:
        futs = [ex.submit(post_chat, gw, chat_body("[[mock: ttft_ms=300; tokens=1]]"), KEY) for _ in range(2)]
        assert [f.result().status_code for f in futs] == [200, 200]
    gw.config_path.write_text(good)


def test_sighup_reloads_the_file(gw, mock):
    assert post_chat(gw, chat_body("x"), key=NEW_KEY).status_code == 401
    rewrite(gw, lambda c: c["tenants"].update({"added": tenant(NEW_KEY)}))
    gw.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:
        r = post_chat(gw, chat_body("hello [[mock: tokens=1]]"), key=NEW_KEY)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert r.status_code == 200, r.text
    assert gw.proc.poll() is None, "SIGHUP must not stop the gateway"


def test_reload_reports_settings_that_need_an_upgrade(gw):
    (port,) = free_ports(1)
    rewrite(gw, lambda c: c["listen"].update(http=f"127.0.0.1:{port}"))
    r = reload(gw)
    assert r.status_code == 200, r.text
    assert r.json()["needs_restart"] == ["listen.http"], r.text
    # The listener did not move.
    assert post_chat(gw, chat_body("still here [[mock: tokens=1]]"), key=KEY).status_code == 200


def test_tenants_removed_by_a_reload_leave_the_gauges(gw):
    name = next(n for n in gw.config["tenants"] if n.startswith("reload-"))
    metrics = lambda: httpx.get(gw.admin_url + "/metrics").text  # noqa: E731
    assert f'llmgw_spend_this_hour_nanousd{{tenant="{name}"}}' in metrics()
    rewrite(gw, lambda c: c["tenants"].pop(name))
    assert reload(gw).status_code == 200
    text = metrics()
    assert f'tenant="{name}"' not in "\n".join(ln for ln in text.splitlines()
                                              if ln.startswith(("llmgw_spend", "llmgw_budget")))
    assert 'llmgw_spend_this_hour_nanousd{tenant="acme"}' in text
