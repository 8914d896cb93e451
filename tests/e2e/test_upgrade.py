"""Graceful upgrade (`serve -u`, Pingora's upgrade socket): a second process takes over
the listeners of a running one, which gets SIGQUIT, hands its sockets over and drains.
A stream in flight completes, a client looping new connections through the switch sees
no refused connection and no failed request, and requests after the switch are served
(and audited) by the new process."""

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
from helpers import ACME, chat_body, new_request_id

GRACE_S = 4
STREAM_TOKENS = 30
STREAM_GAP_MS = 200   # the stream lasts ~6 s: past the old process's 5 s close timeout


def spawn(gateway_bin: Path, d: Path, cfg_path: Path, log: Path, *extra: str) -> subprocess.Popen:
    _LOGS[log.stem] = log
    with open(log, "ab") as f:
        return subprocess.Popen(
            [str(gateway_bin), "serve", "--config", str(cfg_path), *extra],
            stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, cwd=d,
            env=gateway_env({
                "LLM_GATEWAY_PID_FILE": str(d / "llm-gateway.pid"),
                "LLM_GATEWAY_UPGRADE_SOCK": str(d / "upgrade.sock"),
                "LLM_GATEWAY_GRACE_PERIOD_S": str(GRACE_S),
                "LLM_GATEWAY_LOG_FORMAT": "text",
            }))


def wait_ready(proc: subprocess.Popen, admin: str, deadline_s: float = 30) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}"
        try:
            if httpx.get(admin + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    pytest.fail("gateway not ready")


def spool_ids(spool: Path) -> set[str]:
    ids = set()
    for f in spool.glob("audit-*.jsonl"):
        for line in f.read_text().splitlines():
            try:
                ids.add(json.loads(line)["request_id"])
            except (ValueError, KeyError):
                pass
    return ids


def test_upgrade_keeps_the_stream_and_refuses_no_connection(gateway_bin, mock_provider, tmp_path):
    http_port, admin_port = free_ports(2)
    base = f"http://127.0.0.1:{http_port}"
    admin = f"http://127.0.0.1:{admin_port}"
    cfg = base_config(mock_provider.url, http_port, admin_port, tmp_path)
    cfg["audit"]["spool_dir"] = str(tmp_path / "spool-old")
    cfg_path = tmp_path / "gateway.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    procs: list[subprocess.Popen] = []
    try:
        old = spawn(gateway_bin, tmp_path, cfg_path, tmp_path / "upgrade-old.log")
        procs.append(old)
        wait_ready(old, admin)

        # 1. A slow stream on the old process.
        stream: dict = {"datas": []}
        started = threading.Event()

        def run_stream():
            try:
                with httpx.Client(timeout=30) as c:
                    with c.stream("POST", base + "/v1/chat/completions",
                                  headers={"authorization": f"Bearer {ACME}", "x-request-id": "upgrade-stream"},
                                  json=chat_body(f"[[mock: gap_ms={STREAM_GAP_MS}; tokens={STREAM_TOKENS}]]",
                                                 stream=True)) as r:
                        stream["status"] = r.status_code
                        started.set()
                        for line in r.iter_lines():
                            if line.startswith("data:"):
                                stream["datas"].append(line[5:].strip())
            except Exception as e:  # noqa: BLE001 -- reported below
                stream["error"] = repr(e)
            finally:
                started.set()

        t_stream = threading.Thread(target=run_stream, daemon=True)
        t_stream.start()
        assert started.wait(10) and stream.get("status") == 200, stream

        # 2. A client looping new connections through the switch.
        results: list[tuple[str, object]] = []
        stop = threading.Event()

        def loop():
            while not stop.is_set():
                rid = new_request_id("upgrade-loop")
                try:
                    # A fresh connection every time: the switch must not refuse any.
                    with httpx.Client(timeout=10) as c:
                        r = c.post(base + "/v1/chat/completions",
                                   headers={"authorization": f"Bearer {ACME}", "x-request-id": rid},
                                   json=chat_body("[[mock: tokens=1]]"))
                    results.append((rid, r.status_code))
                except httpx.HTTPError as e:
                    results.append((rid, repr(e)))

        t_loop = threading.Thread(target=loop, daemon=True)
        t_loop.start()

        # 3. The new process: same listeners, its own spool so rows tell who served.
        cfg["audit"]["spool_dir"] = str(tmp_path / "spool-new")
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        new = spawn(gateway_bin, tmp_path, cfg_path, tmp_path / "upgrade-new.log", "-u")
        procs.append(new)
        sock = tmp_path / "upgrade.sock"
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert new.poll() is None, f"new process exited: {new.returncode}"
            assert time.monotonic() < deadline, "the new process never opened the upgrade socket"
            time.sleep(0.01)
        old.send_signal(signal.SIGQUIT)
        wait_ready(new, admin)

        # 4. The old process drains and exits; the stream it carried completes.
        old_rc = old.wait(timeout=5 + GRACE_S + 15)
        t_stream.join(30)
        n_during = len(results)
        time.sleep(0.5)  # a few more requests, now only the new process can answer
        stop.set()
        t_loop.join(15)
        assert old_rc == 0, old_rc

        assert "error" not in stream, stream
        assert stream["datas"] and stream["datas"][-1] == "[DONE]", stream["datas"][-3:]
        content = [d for d in stream["datas"][:-1]
                   if (json.loads(d).get("choices") or [{}])[0].get("delta", {}).get("content")]
        assert len(content) == STREAM_TOKENS

        failures = [(rid, res) for rid, res in results if res != 200]
        assert not failures, failures[:5]
        assert n_during >= 10 and len(results) > n_during, (n_during, len(results))

        # Rows: the stream on the old process; the requests after its exit on the new one.
        after_exit = {rid for rid, _ in results[n_during:]}
        assert "upgrade-stream" in spool_ids(tmp_path / "spool-old")
        deadline = time.monotonic() + 5
        while not after_exit <= spool_ids(tmp_path / "spool-new") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert after_exit <= spool_ids(tmp_path / "spool-new")
        assert not after_exit & spool_ids(tmp_path / "spool-old")
        assert new.poll() is None
    finally:
        _stop(procs)
