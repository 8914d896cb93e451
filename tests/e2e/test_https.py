"""`listen.https`: rustls with a certificate generated at test time, HTTP/1.1 (the
official `openai` SDK) and HTTP/2 (httpx over h2) chosen by ALPN, streaming over both,
and the certificate replaced by a config reload."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import time

import httpx
import pytest
import yaml
from openai import OpenAI

from certs import client_context, der_of, make_ca, make_leaf
from conftest import ADMIN_TOKEN, base_config, free_ports
from helpers import ACME, chat_body

GAP_MS = 150
TOKENS = 6
SLOW = f"[[mock: gap_ms={GAP_MS}; tokens={TOKENS}]]"


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    ca = make_ca(d)
    first = make_leaf(d, "first")
    second = make_leaf(d, "second")
    # The gateway reads these two paths; tests copy a leaf over them to rotate.
    live_cert, live_key = d / "live.pem", d / "live.key"
    shutil.copy(first[0], live_cert)
    shutil.copy(first[1], live_key)
    return {"dir": d, "ca": ca, "first": first, "second": second, "cert": live_cert, "key": live_key}


@pytest.fixture(scope="module")
def gw(gateway, tls):
    (port,) = free_ports(1)
    g = gateway({"listen": {"https": {"addr": f"127.0.0.1:{port}", "cert": str(tls["cert"]),
                                      "key": str(tls["key"])}}})
    g.https_url = f"https://127.0.0.1:{port}"
    return g


def sdk(gw, tls) -> OpenAI:
    return OpenAI(base_url=gw.https_url + "/v1", api_key=ACME, max_retries=0, timeout=15,
                  http_client=httpx.Client(verify=client_context(tls["ca"])))


def served_cert(gw, tls) -> bytes:
    """DER of the certificate a fresh TLS handshake presents."""
    host, port = gw.https_url.removeprefix("https://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with client_context(tls["ca"]).wrap_socket(raw, server_hostname="localhost") as s:
            return s.getpeercert(binary_form=True)


def test_openai_sdk_over_https_non_streaming(gw, tls, mock):
    resp = sdk(gw, tls).chat.completions.create(model="gpt-4o-mini",
                                                messages=[{"role": "user", "content": "hi [[mock: tokens=4]]"}])
    assert resp.choices[0].message.content
    assert resp.usage.completion_tokens == 4


def test_openai_sdk_over_https_streams_incrementally(gw, tls, mock):
    arrivals = []
    stream = sdk(gw, tls).chat.completions.create(
        model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": f"count {SLOW}"}])
    text = ""
    for chunk in stream:
        for ch in chunk.choices:
            if ch.delta.content:
                arrivals.append(time.monotonic())
                text += ch.delta.content
    assert text and len(arrivals) >= TOKENS
    # Tokens are spread over the mock's gaps, not delivered in one burst at the end.
    assert arrivals[-1] - arrivals[0] >= (TOKENS - 2) * GAP_MS / 1000, arrivals


def test_http2_by_alpn_non_streaming_and_streaming(gw, tls, mock):
    with httpx.Client(http2=True, verify=client_context(tls["ca"]), timeout=15) as c:
        h = {"authorization": f"Bearer {ACME}", "content-type": "application/json"}
        r = c.post(gw.https_url + "/v1/chat/completions", headers=h,
                   content=json.dumps(chat_body("hello over h2 [[mock: tokens=3]]")))
        assert r.http_version == "HTTP/2", r.http_version
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3
        assert r.headers["x-request-id"]

        arrivals, datas = [], []
        with c.stream("POST", gw.https_url + "/v1/chat/completions", headers=h,
                      content=json.dumps(chat_body(f"stream over h2 {SLOW}", stream=True))) as s:
            assert s.http_version == "HTTP/2"
            assert s.status_code == 200
            for line in s.iter_lines():
                if line.startswith("data:"):
                    arrivals.append(time.monotonic())
                    datas.append(line[5:].strip())
    assert datas[-1] == "[DONE]", datas[-3:]
    content = "".join((json.loads(d)["choices"][0]["delta"].get("content") or "")
                      for d in datas[:-1] if json.loads(d).get("choices"))
    assert content
    assert arrivals[-2] - arrivals[0] >= (TOKENS - 2) * GAP_MS / 1000, arrivals


def test_http11_is_still_offered(gw, tls):
    ctx = client_context(tls["ca"])
    ctx.set_alpn_protocols(["http/1.1"])
    host, port = gw.https_url.removeprefix("https://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            assert s.selected_alpn_protocol() == "http/1.1"


def test_certificate_is_replaced_by_reload_and_a_bad_one_refused(gw, tls):
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    shutil.copy(tls["first"][0], tls["cert"])
    shutil.copy(tls["first"][1], tls["key"])
    assert httpx.post(gw.admin_url + "/admin/v1/reload", headers=admin).status_code == 200
    assert served_cert(gw, tls) == der_of(tls["first"][0])

    # A renewed certificate: new handshakes present it after the reload, without a restart.
    shutil.copy(tls["second"][0], tls["cert"])
    shutil.copy(tls["second"][1], tls["key"])
    assert served_cert(gw, tls) == der_of(tls["first"][0]), "changed before the reload"
    r = httpx.post(gw.admin_url + "/admin/v1/reload", headers=admin)
    assert r.status_code == 200, r.text
    assert served_cert(gw, tls) == der_of(tls["second"][0])

    # A key that does not match the certificate: refused with the reason, old one stays.
    shutil.copy(tls["first"][1], tls["key"])
    r = httpx.post(gw.admin_url + "/admin/v1/reload", headers=admin)
    assert r.status_code == 400, r.text
    assert r.json()["reloaded"] is False and "listen.https" in r.json()["error"], r.text
    assert served_cert(gw, tls) == der_of(tls["second"][0])
    with httpx.Client(verify=client_context(tls["ca"]), timeout=10) as c:
        ok = c.post(gw.https_url + "/v1/chat/completions", headers={"authorization": f"Bearer {ACME}"},
                    json=chat_body("still serving [[mock: tokens=1]]"))
        assert ok.status_code == 200, ok.text
    # Leave the pair consistent for the other tests of this module.
    shutil.copy(tls["second"][1], tls["key"])


def test_untrusted_clients_see_a_tls_error_not_plaintext(gw):
    # A client that does not trust the test CA fails the handshake: the port speaks TLS.
    with pytest.raises(httpx.ConnectError):
        httpx.get(gw.https_url + "/v1/models", verify=ssl.create_default_context(), timeout=5)


def test_readiness_probes_the_tls_listener_without_handshake_errors(gw):
    addr = gw.https_url.removeprefix("https://")
    start = gw.log_path.stat().st_size
    for _ in range(3):
        r = httpx.get(gw.admin_url + "/readyz", timeout=5)
        assert r.status_code == 200, r.text
        assert f"listener {addr}: ok" in r.text, r.text
    with open(gw.log_path, "rb") as f:
        f.seek(start)
        grown = f.read().decode(errors="replace")
    assert "handshake" not in grown.lower(), grown


def test_check_config_refuses_a_certificate_serve_could_not_load(run_cli, tls, tmp_path):
    http_port, admin_port, https_port = free_ports(3)
    cfg = base_config("http://127.0.0.1:9", http_port, admin_port, tmp_path)

    def check(cert, key):
        cfg["listen"]["https"] = {"addr": f"127.0.0.1:{https_port}", "cert": str(cert), "key": str(key)}
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        res = run_cli("check-config", "--config", path)
        return res.returncode, res.stdout + res.stderr

    rc, out = check(*tls["first"])
    assert rc == 0, out
    rc, out = check(tls["first"][0], tls["second"][1])  # key of another certificate
    assert rc != 0 and "listen.https" in out, out
    rc, out = check(tmp_path / "missing.pem", tls["first"][1])
    assert rc != 0 and "listen.https.cert" in out and "missing.pem" in out, out
