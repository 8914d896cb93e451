"""`systemd/llm-gateway.service`: `systemd-analyze verify` (where the tool exists), the
hardening and timeouts the edge node needs, and the unit's own command lines driven
without systemd: ExecStartPre, ExecStart (daemonized, pid file), ExecReload as a config
hot reload (same binary) and as a graceful upgrade (a new binary installed)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import REPO_ROOT, base_config, free_ports, gateway_env, sha256_hex
from helpers import ACME, chat_body, post_chat

UNIT = REPO_ROOT / "systemd" / "llm-gateway.service"
ENV_EXAMPLE = REPO_ROOT / "systemd" / "llm-gateway.env.example"
BIN = "/usr/local/bin/llm-gateway"
CONFIG = "/etc/llm-gateway/gateway.yaml"


def directives(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            k, _, v = line.partition("=")
            out.append((k.strip(), v.strip()))
    return out


def one(d, key: str) -> str:
    vals = [v for k, v in d if k == key]
    assert len(vals) == 1, f"{key}: {vals}"
    return vals[0]


def unit_env(d) -> dict[str, str]:
    return dict(v.split("=", 1) for k, v in d if k == "Environment")


def test_systemd_analyze_verify(gateway_bin, tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    # verify checks that the commands exist: point them at the built binary.
    unit = tmp_path / "llm-gateway.service"
    unit.write_text(UNIT.read_text().replace(BIN, str(gateway_bin)))
    res = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == 0, out
    assert "llm-gateway.service" not in out, out  # no warning about the unit itself


def test_unit_is_hardened_and_waits_longer_than_the_grace_period():
    d = directives(UNIT.read_text())
    env = unit_env(d)
    assert "check-config" in one(d, "ExecStartPre")
    reloads = [v for k, v in d if k == "ExecReload"]
    assert "check-config" in reloads[0] and "-HUP" in reloads[-1] and "serve -d -u" in reloads[-1]
    grace = int(env["LLM_GATEWAY_GRACE_PERIOD_S"])
    # grace period + Pingora's 5 s runtime shutdown must fit before systemd kills.
    assert int(one(d, "TimeoutStopSec")) > grace + 5
    assert one(d, "User") not in ("", "root") and one(d, "NoNewPrivileges") == "yes"
    assert one(d, "ProtectSystem") == "strict"
    state = "/var/lib/" + one(d, "StateDirectory")
    assert state in one(d, "ReadWritePaths").split()
    assert int(one(d, "LimitNOFILE")) >= 65536
    assert env["LLM_GATEWAY_PID_FILE"] == one(d, "PIDFile")
    assert env["LLM_GATEWAY_PID_FILE"].startswith("/run/" + one(d, "RuntimeDirectory") + "/")
    assert env["LLM_GATEWAY_UPGRADE_SOCK"].startswith("/run/" + one(d, "RuntimeDirectory") + "/")
    assert env["LLM_GATEWAY_LOG_FORMAT"] == "json"
    # Every secret the example config names has a line in the environment file example.
    example = (REPO_ROOT / "conf" / "gateway.example.yaml").read_text()
    named = set(re.findall(r"_env:\s*([A-Z][A-Z0-9_]+)", example))
    assert named and named <= set(re.findall(r"^([A-Z][A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.M))
    assert one(d, "EnvironmentFile").lstrip("-") == "/etc/llm-gateway/llm-gateway.env"


# --------------------------------------------------------------------------- the unit's commands


class Node:
    """The unit's commands with the binary and config paths moved into a temp dir."""

    def __init__(self, tmp: Path, mock_url: str):
        self.tmp = tmp
        self.bin = tmp / "bin" / "llm-gateway"
        self.bin.parent.mkdir()
        self.install_binary()
        http_port, admin_port = free_ports(2)
        self.base_url, self.admin = f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{admin_port}"
        self.cfg = base_config(mock_url, http_port, admin_port, tmp)
        self.cfg_path = tmp / "gateway.yaml"
        self.write_config()
        d = directives(UNIT.read_text())
        self.units = d
        self.env = gateway_env({**unit_env(d), "LLM_GATEWAY_PID_FILE": str(tmp / "llm-gateway.pid"),
                                "LLM_GATEWAY_UPGRADE_SOCK": str(tmp / "upgrade.sock"),
                                "LLM_GATEWAY_GRACE_PERIOD_S": "2"})
        self.log = open(tmp / "node.log", "ab")

    def install_binary(self) -> None:
        """Like `install`: a new file renamed over the old one (the running inode is kept)."""
        src = Path(os.environ.get("LLM_GATEWAY_BIN") or REPO_ROOT / "target" / "debug" / "llm-gateway")
        staged = self.bin.with_suffix(".new")
        shutil.copy2(src, staged)
        os.replace(staged, self.bin)

    def write_config(self) -> None:
        self.cfg_path.write_text(yaml.safe_dump(self.cfg, sort_keys=False))

    def argv(self, line: str) -> list[str]:
        line = line.replace(BIN, str(self.bin)).replace(CONFIG, str(self.cfg_path)).replace("$$", "$")
        return shlex.split(line)

    def run(self, key: str, index: int = 0, mainpid: int | None = None, timeout: float = 30):
        line = [v for k, v in self.units if k == key][index]
        env = dict(self.env, **({"MAINPID": str(mainpid)} if mainpid else {}))
        return subprocess.run(self.argv(line), cwd=self.tmp, env=env, stdout=self.log, stderr=self.log,
                              stdin=subprocess.DEVNULL, timeout=timeout)

    def pid(self) -> int:
        return int((self.tmp / "llm-gateway.pid").read_text().strip())

    def ready(self, deadline_s: float = 30) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.admin + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        pytest.fail("the daemonized gateway did not become ready:\n" + (self.tmp / "node.log").read_text()[-3000:])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive for our purposes (its parent exited: reaped by init).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still running"
        time.sleep(0.05)


def test_unit_commands_start_reload_and_upgrade(mock_provider, tmp_path):
    node = Node(tmp_path, mock_provider.url)
    pids = []
    try:
        assert node.run("ExecStartPre").returncode == 0
        assert node.run("ExecStart").returncode == 0  # returns once daemonized
        node.ready()
        pid = node.pid()
        pids.append(pid)
        assert alive(pid)
        assert post_chat(node, chat_body("[[mock: tokens=1]]")).status_code == 200

        # Reload, same binary: SIGHUP, the same process applies the new file.
        new_key = "sk-systemd-added"
        node.cfg["tenants"]["added"] = {"api_keys": [{"id": "a", "sha256": sha256_hex(new_key)}],
                                        "models": ["gpt-4o-mini"]}
        node.write_config()
        assert node.run("ExecReload", 0).returncode == 0
        assert node.run("ExecReload", 1, mainpid=pid).returncode == 0
        deadline = time.monotonic() + 10
        while post_chat(node, chat_body("[[mock: tokens=1]]"), key=new_key).status_code != 200:
            assert time.monotonic() < deadline, "SIGHUP reload did not apply"
            time.sleep(0.05)
        assert node.pid() == pid and alive(pid)

        # A broken file: ExecReload's check-config fails, the running process is untouched.
        good = node.cfg_path.read_text()
        node.cfg_path.write_text("tenants: {acme: {models: [no-such-model]}}\n")
        assert node.run("ExecReload", 0).returncode != 0
        node.cfg_path.write_text(good)

        # Reload after a new binary was installed: graceful upgrade to a new main process.
        node.install_binary()
        assert node.run("ExecReload", 0).returncode == 0
        assert node.run("ExecReload", 1, mainpid=pid).returncode == 0
        new_pid = node.pid()
        pids.append(new_pid)
        assert new_pid != pid and alive(new_pid)
        wait_gone(pid, 5 + 2 + 15)  # close timeout + grace period + runtime shutdown
        node.ready()
        assert post_chat(node, chat_body("[[mock: tokens=1]]"), key=new_key).status_code == 200
        assert post_chat(node, chat_body("[[mock: tokens=1]]"), key=ACME).status_code == 200
    finally:
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGTERM)
        for p in pids:
            try:
                wait_gone(p, 15)
            except AssertionError:
                os.kill(p, signal.SIGKILL)
        node.log.close()
