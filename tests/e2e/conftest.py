"""Fixtures of the end-to-end suite: the real `llm-gateway` binary on free loopback ports.

* `gateway_bin`   -- path of the binary (env `LLM_GATEWAY_BIN`, default target/debug/llm-gateway).
* `mock_provider` -- one `llm-gateway mock-provider` for the whole session.
* `mock`          -- the same, with its request log cleared before the test.
* `tls_mock`      -- a factory: `tls_mock(name, *args)` starts (or reuses) a
                     `mock-provider --tls-cert --tls-key` (HTTPS, HTTP/2 and HTTP/1.1 by
                     ALPN) with a certificate for localhost/127.0.0.1 from certs.py; its
                     `ca` is the CA a client must trust (the gateway: `SSL_CERT_FILE`).
* `gateway`       -- a factory: `gateway(overrides=None, env=None)` starts (or reuses) a
                     `llm-gateway serve` whose config is the standard test config below,
                     deep-merged with `overrides` (a `None` value deletes a key), with
                     extra environment variables `env`.
* `closed_port`   -- a loopback port on which nothing listens (connections are refused).
* `pg_server`     -- one private PostgreSQL server for the session (pgserver.py), database
                     `gateway` at `pg_server.url`; tests sharing it take a database of
                     their own with `pg_server.create_database(name)` and must not stop
                     or pause it.
* `private_pg`    -- a factory: `private_pg()` starts a PostgreSQL server for this test
                     alone (to stop, restart or pause), removed at the test's end.

Every process writes its output to a log file in the session's temp dir; when a test
fails, the part of each log written during that test is attached to the report.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
import yaml

from certs import client_context, make_ca, make_leaf
from helpers import header_of, header_pairs  # noqa: F401  (re-exported)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Keys of the standard test config.
TENANT_KEYS = {
    "acme": "sk-acme-test",
    "globex": "sk-globex-test",
    "solo": "sk-solo",
}
UPSTREAM_ENV = {
    "MOCK_OPENAI_KEY": "sk-upstream-openai",
    "MOCK_ANTHROPIC_KEY": "sk-upstream-anthropic",
    "GATEWAY_ADMIN_TOKEN": "admin-test-token",
}
ADMIN_TOKEN = UPSTREAM_ENV["GATEWAY_ADMIN_TOKEN"]

START_DEADLINE_S = 30.0
STOP_GRACE_S = 3.0

# name -> log file of every process started in this session (for failure reports).
_LOGS: dict[str, Path] = {}


def sha256_hex(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (bound to port 0 together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def deep_merge(base: dict, overrides: dict | None) -> dict:
    """`base` updated by `overrides`, recursively for dicts; lists are replaced and a
    `None` value removes the key."""
    out = copy.deepcopy(base)
    for k, v in (overrides or {}).items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def base_config(mock_url: str, http_port: int, admin_port: int, data_dir: Path) -> dict:
    """The standard test config (contract format, see shared/DESIGN.md)."""
    timeouts = {"connect_ms": 2000, "first_token_ms": 10000, "idle_ms": 10000, "total_ms": 60000}
    return {
        "node": {"region": "us-east-1"},
        "listen": {"http": f"127.0.0.1:{http_port}"},
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token_env": "GATEWAY_ADMIN_TOKEN"},
        "max_body_bytes": 4194304,
        "providers": {
            "openai": {
                "kind": "openai",
                "base_url": mock_url,
                "api_key_env": "MOCK_OPENAI_KEY",
                "region": "us-east-1",
                "timeouts": dict(timeouts),
            },
            "inhouse": {
                "kind": "openai_compatible",
                "base_url": f"{mock_url}/inhouse",
                "region": "us-east-1",
                "timeouts": dict(timeouts),
            },
            "anthropic": {
                "kind": "anthropic",
                "base_url": mock_url,
                "api_key_env": "MOCK_ANTHROPIC_KEY",
                "region": "us-east-1",
                "timeouts": dict(timeouts),
            },
        },
        "models": {
            "gpt-4o-mini": {
                "provider": "openai",
                "upstream_model": "gpt-4o-mini-2024-07-18",
                "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.60, "cached_input_per_mtok": 0.075},
                "max_output_tokens": 4096,
            },
            "llama-70b": {
                "provider": "inhouse",
                "price": {"input_per_mtok": 0.10, "output_per_mtok": 0.10},
                "max_output_tokens": 4096,
            },
            "claude-haiku": {
                "provider": "anthropic",
                "upstream_model": "claude-3-5-haiku-20241022",
                "price": {"input_per_mtok": 0.80, "output_per_mtok": 4.00},
                "max_output_tokens": 4096,
            },
        },
        "tenants": {
            "acme": {
                "api_keys": [{"id": "acme-test", "sha256": sha256_hex(TENANT_KEYS["acme"])}],
                "models": ["gpt-4o-mini", "llama-70b", "claude-haiku"],
            },
            "globex": {
                "api_keys": [{"id": "globex-test", "sha256": sha256_hex(TENANT_KEYS["globex"])}],
                "models": ["llama-70b"],
                "pin_model": "llama-70b",
            },
            "solo": {
                "api_keys": [{"id": "solo-test", "sha256": sha256_hex(TENANT_KEYS["solo"])}],
                "models": ["gpt-4o-mini"],
            },
        },
        "counters": {"backend": "memory"},
        "audit": {"spool_dir": str(data_dir / "spool")},
    }


def gateway_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(UPSTREAM_ENV)
    env.setdefault("RUST_LOG", "info")
    env.setdefault("RUST_BACKTRACE", "1")
    env.update(extra or {})
    return env


def _tail(path: Path, start: int = 0, max_lines: int = 150, max_line: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    lines = data.decode("utf-8", "replace").splitlines()
    cut = len(lines) - max_lines
    lines = [ln if len(ln) <= max_line else ln[:max_line] + " ...<cut>" for ln in lines[-max_lines:]]
    head = [f"... ({cut} earlier lines)"] if cut > 0 else []
    return "\n".join(head + lines) or "<empty>"


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process, give them STOP_GRACE_S together, then SIGKILL."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_GRACE_S
    for p in live:
        try:
            p.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


# --------------------------------------------------------------------------- binary


@pytest.fixture(scope="session")
def gateway_bin() -> Path:
    p = Path(os.environ.get("LLM_GATEWAY_BIN") or REPO_ROOT / "target" / "debug" / "llm-gateway")
    if not p.is_absolute():
        p = (REPO_ROOT / p).resolve()
    if not (p.is_file() and os.access(p, os.X_OK)):
        pytest.fail(f"llm-gateway binary not found at {p}: run `cargo build --bin llm-gateway` "
                    "or set LLM_GATEWAY_BIN", pytrace=False)
    return p


@pytest.fixture(scope="session")
def run_cli(gateway_bin: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Runs `llm-gateway ARGS...` to completion (with the upstream key env vars set)."""

    def run(*args: str, timeout: float = 30, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(gateway_bin), *map(str, args)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=gateway_env(env),
        )

    return run


# --------------------------------------------------------------------------- mock provider


@dataclass
class MockProvider:
    url: str
    proc: subprocess.Popen
    log_path: Path
    # The CA of a TLS mock's certificate (`start_tls_mock`); None for plain HTTP.
    ca: Path | None = None
    _http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=10))

    def requests(self) -> list[dict]:
        """Requests the mock received since the last reset (its own /_mock calls excluded)."""
        r = self._http.get(f"{self.url}/_mock/requests")
        r.raise_for_status()
        return [q for q in r.json() if not str(q.get("path", "")).startswith("/_mock")]

    def only_request(self, path_suffix: str = "") -> dict:
        """The single request received (whose path ends with `path_suffix`)."""
        reqs = [q for q in self.requests() if str(q.get("path", "")).endswith(path_suffix)]
        assert len(reqs) == 1, f"expected exactly one upstream request *{path_suffix}, got {len(reqs)}: {reqs}"
        return reqs[0]

    def reset(self) -> None:
        self._http.post(f"{self.url}/_mock/reset").raise_for_status()

    def stats(self) -> dict:
        r = self._http.get(f"{self.url}/_mock/stats")
        r.raise_for_status()
        return r.json()


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llm-gateway-e2e")


def start_mock(gateway_bin: Path, log_path: Path, *extra_args: str, ca: Path | None = None) -> MockProvider:
    """Starts `mock-provider` on a free port and waits for its readiness line; `ca` is the
    CA to verify it with when `extra_args` make it serve HTTPS."""
    proc = subprocess.Popen(
        [str(gateway_bin), "mock-provider", "--listen", "127.0.0.1:0", *extra_args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=gateway_env(),
    )
    _LOGS[log_path.stem] = log_path
    found: dict[str, str] = {}
    ready = threading.Event()
    pattern = re.compile(r"mock-provider listening on (https?://\S+)")

    def pump() -> None:
        # Tees the process output into its log file for as long as it runs.
        with open(log_path, "ab", buffering=0) as log:
            for raw in iter(proc.stdout.readline, b""):
                log.write(raw)
                if not ready.is_set():
                    m = pattern.search(raw.decode("utf-8", "replace"))
                    if m:
                        found["url"] = m.group(1).rstrip("/")
                        ready.set()
        ready.set()  # EOF: the process ended

    threading.Thread(target=pump, name=f"pump-{log_path.stem}", daemon=True).start()
    if not ready.wait(START_DEADLINE_S) or "url" not in found:
        _stop([proc])
        pytest.fail(f"mock-provider did not print its listening line within {START_DEADLINE_S}s "
                    f"(exit={proc.poll()}):\n{_tail(log_path)}", pytrace=False)
    if ca is None:
        return MockProvider(url=found["url"], proc=proc, log_path=log_path)
    return MockProvider(url=found["url"], proc=proc, log_path=log_path, ca=ca,
                        _http=httpx.Client(timeout=10, verify=client_context(ca)))


def start_tls_mock(gateway_bin: Path, log_path: Path, cert_dir: Path, *extra_args: str) -> MockProvider:
    """Starts `mock-provider` in TLS mode with a new CA and a leaf for localhost and
    127.0.0.1 made in `cert_dir` (certs.py); its `url` is `https://127.0.0.1:PORT`."""
    ca = make_ca(cert_dir)
    cert, key = make_leaf(cert_dir, "mock")
    return start_mock(gateway_bin, log_path, "--tls-cert", str(cert), "--tls-key", str(key), *extra_args, ca=ca)


@pytest.fixture(scope="session")
def mock_provider(gateway_bin: Path, session_tmp: Path):
    m = start_mock(gateway_bin, session_tmp / "mock-provider.log")
    yield m
    _stop([m.proc])


@pytest.fixture
def mock(mock_provider: MockProvider) -> MockProvider:
    """The session's mock provider with an empty request log."""
    if mock_provider.proc.poll() is not None:
        pytest.fail(f"mock-provider exited ({mock_provider.proc.returncode}):\n{_tail(mock_provider.log_path)}",
                    pytrace=False)
    mock_provider.reset()
    return mock_provider


@pytest.fixture(scope="session")
def closed_port() -> int:
    """A loopback port that refuses connections: bound (so nobody else gets it) but not
    listening, for the whole session."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


# --------------------------------------------------------------------------- gateway


@dataclass
class Gateway:
    name: str
    base_url: str
    admin_url: str
    proc: subprocess.Popen
    log_path: Path
    config_path: Path
    config: dict

    def log_text(self) -> str:
        return _tail(self.log_path, max_lines=400)


@pytest.fixture(scope="session")
def gateway(gateway_bin: Path, mock_provider: MockProvider, session_tmp: Path):
    """Factory `gateway(overrides=None) -> Gateway`; one process per distinct `overrides`,
    shared by the tests that ask for the same, stopped at the end of the session."""
    started: dict[str, Gateway] = {}
    procs: list[subprocess.Popen] = []

    def make(overrides: dict | None = None, env: dict | None = None) -> Gateway:
        key = json.dumps([overrides or {}, env or {}], sort_keys=True)
        gw = started.get(key)
        if gw is not None:
            if gw.proc.poll() is not None:
                pytest.fail(f"gateway {gw.name} exited ({gw.proc.returncode}):\n{gw.log_text()}", pytrace=False)
            return gw
        name = f"gateway-{len(started) + 1}"
        d = session_tmp / name
        d.mkdir()
        http_port, admin_port = free_ports(2)
        cfg = deep_merge(base_config(mock_provider.url, http_port, admin_port, d), overrides)
        cfg_path = d / "gateway.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        log_path = session_tmp / f"{name}.log"
        _LOGS[name] = log_path
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [str(gateway_bin), "serve", "--config", str(cfg_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=d,
                env=gateway_env({
                    # Pingora's pid file and upgrade socket, private to this instance.
                    "LLM_GATEWAY_PID_FILE": str(d / "llm-gateway.pid"),
                    "LLM_GATEWAY_UPGRADE_SOCK": str(d / "upgrade.sock"),
                    **(env or {}),
                }),
            )
        procs.append(proc)
        listen = cfg.get("listen", {}).get("http", f"127.0.0.1:{http_port}")
        admin = cfg.get("admin", {}).get("listen", f"127.0.0.1:{admin_port}")
        gw = Gateway(name=name, base_url=f"http://{listen}", admin_url=f"http://{admin}", proc=proc,
                     log_path=log_path, config_path=cfg_path, config=cfg)
        _wait_ready(gw)
        started[key] = gw
        return gw

    yield make
    _stop(procs)


def _wait_ready(gw: Gateway) -> None:
    """Polls /readyz on the admin listener (and a TCP connect to the client listener)
    until both answer, the process dies, or the deadline passes."""
    deadline = time.monotonic() + START_DEADLINE_S
    host, port = gw.base_url.removeprefix("http://").rsplit(":", 1)
    last = "no answer"
    with httpx.Client(timeout=1.0) as c:
        while time.monotonic() < deadline:
            if gw.proc.poll() is not None:
                pytest.fail(f"{gw.name} exited with {gw.proc.returncode} before it was ready; config "
                            f"{gw.config_path}:\n{gw.log_text()}", pytrace=False)
            try:
                r = c.get(f"{gw.admin_url}/readyz")
                last = f"/readyz -> {r.status_code}"
                if r.status_code == 200:
                    with socket.create_connection((host, int(port)), timeout=1.0):
                        return
            except (httpx.HTTPError, OSError) as e:
                last = repr(e)
            time.sleep(0.05)
    _stop([gw.proc])
    pytest.fail(f"{gw.name} not ready within {START_DEADLINE_S}s ({last}):\n{gw.log_text()}", pytrace=False)


# --------------------------------------------------------------------------- failure reports


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item._log_offsets = {p: (p.stat().st_size if p.exists() else 0) for p in _LOGS.values()}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        offsets = getattr(item, "_log_offsets", {})
        quiet = []
        for name, path in list(_LOGS.items()):
            start = offsets.get(path, 0)
            try:
                grew = path.stat().st_size > start
            except OSError:
                grew = False
            if grew:
                rep.sections.append((f"{name} log during this test ({path})", _tail(path, start)))
            else:
                quiet.append(f"{name}: no output during this test (full log: {path})")
        if quiet:
            rep.sections.append(("other process logs", "\n".join(quiet)))


# --------------------------------------------------------------------------- extra mock providers


@pytest.fixture(scope="session")
def extra_mock(gateway_bin: Path, session_tmp: Path):
    """Factory `extra_mock(name, *args) -> MockProvider`: another `mock-provider` process
    with its own command-line defaults (e.g. `"--ttft-ms", "5000"` for a provider whose
    first token is late), for faults that must hit one provider and not the others. One
    process per `name`, shared by the session, stopped at its end."""
    started: dict[str, MockProvider] = {}

    def make(name: str, *args: str) -> MockProvider:
        m = started.get(name)
        if m is None:
            m = start_mock(gateway_bin, session_tmp / f"mock-{name}.log", *args)
            started[name] = m
        elif m.proc.poll() is not None:
            pytest.fail(f"mock-{name} exited ({m.proc.returncode}):\n{_tail(m.log_path)}", pytrace=False)
        return m

    yield make
    _stop([m.proc for m in started.values()])


@pytest.fixture(scope="session")
def tls_mock(gateway_bin: Path, session_tmp: Path):
    """Factory `tls_mock(name="tls", *args) -> MockProvider`: a `mock-provider` serving
    HTTPS (HTTP/2 and HTTP/1.1 by ALPN) with its own test CA (`.ca`), started by
    `start_tls_mock`. One process per `name`, shared by the session; its request log is
    cleared on every call."""
    started: dict[str, MockProvider] = {}

    def make(name: str = "tls", *args: str) -> MockProvider:
        m = started.get(name)
        if m is None:
            m = start_tls_mock(gateway_bin, session_tmp / f"mock-{name}.log", session_tmp / f"certs-{name}", *args)
            started[name] = m
        elif m.proc.poll() is not None:
            pytest.fail(f"mock-{name} exited ({m.proc.returncode}):\n{_tail(m.log_path)}", pytrace=False)
        m.reset()
        return m

    yield make
    _stop([m.proc for m in started.values()])


# --------------------------------------------------------------------------- PostgreSQL


def _start_pg(name: str) -> "PgServer":
    from pgserver import PgError, PgServer
    try:
        pg = PgServer()
    except PgError as e:
        pytest.fail(str(e), pytrace=False)
    _LOGS[name] = pg.log_path
    try:
        return pg.start()
    except PgError as e:
        pg.cleanup()
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL server shared by the session (see the module doc)."""
    pg = _start_pg("postgres-session")
    yield pg
    pg.cleanup()


@pytest.fixture
def private_pg(request):
    """Factory `private_pg() -> PgServer`: a server of this test's own, cleaned up after it."""
    made = []

    def make():
        pg = _start_pg(f"postgres-{request.node.name}-{len(made) + 1}")
        made.append(pg)
        return pg

    yield make
    for pg in made:
        pg.cleanup()
