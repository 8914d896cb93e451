"""SIGTERM: the gateway exits as soon as no request is in flight (an idle one at once, not
after the grace period), keeps serving a stream still running until it ends (up to the grace
period) with its audit row written, and stops one that outlives the grace period."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import _LOGS, _stop, base_config, free_ports, gateway_env
from helpers import ACME, chat_body

IDLE_EXIT_BOUND_S = 3.0  # an idle gateway must be gone this soon after SIGTERM


class Node:
    def __init__(self, gateway_bin: Path, mock_url: str, d: Path, grace_s: int):
        http_port, admin_port = free_ports(2)
        self.base = f"http://127.0.0.1:{http_port}"
        self.admin = f"http://127.0.0.1:{admin_port}"
        self.spool = d / "spool"
        cfg = base_config(mock_url, http_port, admin_port, d)
        cfg["audit"]["spool_dir"] = str(self.spool)
        cfg_path = d / "gateway.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        log = d / "shutdown.log"
        _LOGS[f"shutdown-{d.name}"] = log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(
                [str(gateway_bin), "serve", "--config", str(cfg_path)],
                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, cwd=d,
                env=gateway_env({
                    "LLM_GATEWAY_PID_FILE": str(d / "llm-gateway.pid"),
                    "LLM_GATEWAY_UPGRADE_SOCK": str(d / "upgrade.sock"),
                    "LLM_GATEWAY_GRACE_PERIOD_S": str(grace_s),
                }))
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, f"exited with {self.proc.returncode}"
            try:
                if httpx.get(self.admin + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "gateway not ready"
            time.sleep(0.05)

    def spool_ids(self) -> set[str]:
        ids = set()
        for f in self.spool.glob("audit-*.jsonl"):
            for line in f.read_text().splitlines():
                ids.add(json.loads(line)["request_id"])
        return ids

    def sigterm_and_wait(self, timeout: float) -> tuple[int, float, float]:
        """(exit code, seconds from SIGTERM to exit, monotonic time of the exit)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        exited_at = time.monotonic()
        return rc, exited_at - t0, exited_at


class Stream:
    """A streamed chat completion read on a thread: its data lines and when it ended."""

    def __init__(self, base: str, request_id: str, tokens: int, gap_ms: int):
        self.datas: list[str] = []
        self.error: str | None = None
        self.ended_at: float | None = None
        self.started = threading.Event()
        body = chat_body(f"[[mock: gap_ms={gap_ms}; tokens={tokens}]]", stream=True)
        headers = {"authorization": f"Bearer {ACME}", "x-request-id": request_id}

        def run():
            try:
                with httpx.Client(timeout=60) as c:
                    with c.stream("POST", base + "/v1/chat/completions", headers=headers, json=body) as r:
                        assert r.status_code == 200, r.status_code
                        for line in r.iter_lines():
                            if line.startswith("data:"):
                                self.datas.append(line[5:].strip())
                                self.started.set()
            except Exception as e:  # noqa: BLE001 -- asserted by the test
                self.error = repr(e)
            finally:
                self.ended_at = time.monotonic()
                self.started.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def content_chunks(self) -> int:
        return sum(1 for d in self.datas if d != "[DONE]"
                   and (json.loads(d).get("choices") or [{}])[0].get("delta", {}).get("content"))


@pytest.fixture
def node(gateway_bin, mock_provider, tmp_path):
    made: list[Node] = []

    def make(grace_s: int) -> Node:
        n = Node(gateway_bin, mock_provider.url, tmp_path, grace_s)
        made.append(n)
        return n

    yield make
    _stop([n.proc for n in made])


def test_idle_gateway_exits_at_once_on_sigterm(node):
    n = node(grace_s=30)
    with httpx.Client(timeout=10) as c:  # a served request, its keep-alive connection left open
        r = c.post(n.base + "/v1/chat/completions", headers={"authorization": f"Bearer {ACME}",
                   "x-request-id": "idle-before-stop"}, json=chat_body("[[mock: tokens=2]]"))
        assert r.status_code == 200
        rc, took, _ = n.sigterm_and_wait(timeout=40)
    assert rc == 0
    assert took < IDLE_EXIT_BOUND_S, f"an idle gateway took {took:.2f} s to exit (grace period 30 s)"
    assert "idle-before-stop" in n.spool_ids()


def test_stream_in_flight_is_served_to_its_end_then_the_gateway_exits(node):
    n = node(grace_s=30)
    tokens = 15
    s = Stream(n.base, "stream-through-stop", tokens=tokens, gap_ms=200)  # ~3 s
    assert s.started.wait(10) and s.datas, s.error
    rc, took, exited_at = n.sigterm_and_wait(timeout=40)
    s.thread.join(10)
    assert s.error is None, s.error
    assert s.datas[-1] == "[DONE]" and s.content_chunks() == tokens, s.datas[-3:]
    assert rc == 0
    # The whole stream came through after the SIGTERM (so the process outlived it), and
    # the process did not linger for the rest of the 30 s grace period.
    assert took > 1.0, f"exited {took:.2f} s after SIGTERM, before the ~3 s stream could end"
    assert s.ended_at is not None and exited_at - s.ended_at < IDLE_EXIT_BOUND_S, (took, exited_at - s.ended_at)
    assert "stream-through-stop" in n.spool_ids(), "the stream's audit row is in the spool at exit"


def test_stream_longer_than_the_grace_period_does_not_hold_the_process(node):
    n = node(grace_s=1)
    s = Stream(n.base, "stream-past-grace", tokens=100, gap_ms=200)  # ~20 s
    assert s.started.wait(10) and s.datas, s.error
    rc, took, _ = n.sigterm_and_wait(timeout=30)
    s.thread.join(10)
    assert rc == 0
    # grace period, then Pingora's runtime shutdown (up to 5 s)
    assert took < 1 + 5 + 2, took
    assert "[DONE]" not in s.datas, "the stream was cut at the end of the grace period"
