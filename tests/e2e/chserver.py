"""A private ClickHouse server for the audit tests: Debian's `clickhouse-server`
(18.16, installed by tests/run.sh) on free loopback ports (HTTP, native TCP and
interserver), with its data, logs and a minimal config.xml/users.xml in a temp dir.

`start()` waits for `GET /ping` to answer `Ok.`; `stop()` ends it (SIGTERM, then
SIGKILL); `start()` again brings it back on the same data and the same ports (a
gateway configured with `url` finds it again). No pytest here: loadtest/audit_bench.py
uses it too; failures raise `ClickHouseError`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

START_DEADLINE_S = 60.0

CONFIG_XML = """<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level>
        <log>{dir}/log/clickhouse-server.log</log>
        <errorlog>{dir}/log/clickhouse-server.err.log</errorlog>
        <size>10M</size>
        <count>1</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http}</http_port>
    <tcp_port>{tcp}</tcp_port>
    <interserver_http_port>{interserver}</interserver_http_port>
    <path>{dir}/data/</path>
    <tmp_path>{dir}/tmp/</tmp_path>
    <user_files_path>{dir}/user_files/</user_files_path>
    <format_schema_path>{dir}/format_schemas/</format_schema_path>
    <users_config>{dir}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>67108864</mark_cache_size>
    <uncompressed_cache_size>67108864</uncompressed_cache_size>
    <max_concurrent_queries>50</max_concurrent_queries>
</yandex>
"""

USERS_XML = """<?xml version="1.0"?>
<yandex>
    <profiles><default><max_memory_usage>1000000000</max_memory_usage></default></profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
        <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time>
    </interval></default></quotas>
</yandex>
"""


class ClickHouseError(Exception):
    pass


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (bound to port 0 together, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"<cannot read {path}: {e}>"


def server_binary() -> str:
    for cand in (shutil.which("clickhouse-server"), "/usr/sbin/clickhouse-server", "/usr/bin/clickhouse-server"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise ClickHouseError("clickhouse-server not found: tests/run.sh installs it "
                          "(apt-get install clickhouse-server)")


class ClickHouse:
    def __init__(self, directory: Path):
        self.dir = directory
        self.proc: subprocess.Popen | None = None
        self.ports: list[int] = []
        self.log_path = directory / "stdout.log"
        self.err_log = directory / "log" / "clickhouse-server.err.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports[0]}"

    def start(self) -> "ClickHouse":
        for sub in ("data", "tmp", "user_files", "format_schemas", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        if not self.ports:
            self.ports = free_ports(3)
        http, tcp, interserver = self.ports
        (self.dir / "config.xml").write_text(
            CONFIG_XML.format(dir=self.dir, http=http, tcp=tcp, interserver=interserver))
        (self.dir / "users.xml").write_text(USERS_XML)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([server_binary(), f"--config-file={self.dir / 'config.xml'}"],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=self.dir)
        deadline = time.monotonic() + START_DEADLINE_S
        last = "no answer"
        with httpx.Client(timeout=1.0) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ClickHouseError(f"clickhouse-server exited with {self.proc.returncode}:\n{self.logs()}")
                try:
                    r = c.get(f"{self.url}/ping")
                    if r.status_code == 200 and r.text.strip() == "Ok.":
                        return self
                    last = f"/ping -> {r.status_code} {r.text[:100]!r}"
                except httpx.HTTPError as e:
                    last = repr(e)
                time.sleep(0.05)
        self.stop()
        raise ClickHouseError(f"clickhouse-server not ready within {START_DEADLINE_S}s ({last}):\n{self.logs()}")

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)

    def logs(self) -> str:
        return _tail(self.log_path) + "\n" + _tail(self.err_log)

    def query(self, sql: str, database: str = "default", timeout: float = 10.0) -> str:
        r = httpx.post(f"{self.url}/", params={"database": database}, content=sql.encode(), timeout=timeout)
        if r.status_code != 200:
            raise ClickHouseError(f"ClickHouse refused {sql!r}: {r.status_code} {r.text}")
        return r.text

    def rows(self, sql: str, database: str = "default") -> list[dict]:
        """The rows of a SELECT, as dicts (JSONEachRow, 64-bit integers unquoted)."""
        r = httpx.post(f"{self.url}/", params={"database": database, "output_format_json_quote_64bit_integers": "0"},
                       content=f"{sql} FORMAT JSONEachRow".encode(), timeout=10.0)
        if r.status_code != 200:
            raise ClickHouseError(f"ClickHouse refused {sql!r}: {r.status_code} {r.text}")
        return [json.loads(line) for line in r.text.splitlines() if line.strip()]
