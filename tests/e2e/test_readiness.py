"""`/readyz` is 200 only when the config, the counter store and the client listeners are
up: a Redis counter store that goes away under `fail_closed` takes the node out of the
load balancer (503, with the reason) until it is back; under `fail_open` the node stays
ready and says it serves uncounted."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_ports


def start_redis(port: int, d: Path) -> subprocess.Popen:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (tests/run.sh installs it)")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            pass
        assert proc.poll() is None, "redis-server exited"
        time.sleep(0.02)
    proc.kill()
    pytest.fail("redis-server did not answer PING")


def readyz(gw) -> httpx.Response:
    return httpx.get(gw.admin_url + "/readyz", timeout=5)


def wait_status(gw, status: int, timeout: float = 15) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = readyz(gw)
        if r.status_code == status or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def test_not_ready_while_redis_is_down_under_fail_closed(gateway, tmp_path):
    (port,) = free_ports(1)
    redis = start_redis(port, tmp_path)
    try:
        gw = gateway({"counters": {"backend": "redis", "url": f"redis://127.0.0.1:{port}",
                                   "on_error": "fail_closed"}})
        r = readyz(gw)
        assert r.status_code == 200 and "counters: ok (redis)" in r.text, r.text

        redis.terminate()
        redis.wait(10)
        r = wait_status(gw, 503)
        assert r.status_code == 503, r.text
        assert r.text.startswith("not ready\n") and "counters: redis unreachable (fail_closed)" in r.text, r.text
        assert httpx.get(gw.admin_url + "/healthz").status_code == 200  # alive, just not ready

        redis = start_redis(port, tmp_path)
        r = wait_status(gw, 200)
        assert r.status_code == 200, r.text
    finally:
        redis.kill()
        redis.wait(10)


def test_ready_but_degraded_without_redis_under_fail_open(gateway, closed_port):
    gw = gateway({"counters": {"backend": "redis", "url": f"redis://127.0.0.1:{closed_port}",
                               "on_error": "fail_open"}})
    r = readyz(gw)
    assert r.status_code == 200, r.text
    assert "serving uncounted (fail_open)" in r.text, r.text
