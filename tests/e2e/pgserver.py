"""A private PostgreSQL server for the tests: Debian's `postgresql` (installed by
tests/run.sh; binaries in /usr/lib/postgresql/<version>/bin, found by glob) with its own
cluster in a temp dir, on a free loopback port.

* `initdb` and `postgres` refuse to run as root: when the tests run as root they run as
  the `postgres` OS user (`runuser -u postgres --`), and the temp dir is theirs. It is
  made with `tempfile.mkdtemp` (under /tmp) rather than under pytest's `tmp_path`,
  because pytest's directories are 0700 root and `postgres` could not reach them.
* Trust authentication on 127.0.0.1 only (and the unix socket, which lives in the temp
  dir, not in /var/run/postgresql); `listen_addresses = '127.0.0.1'`.
* `start()` waits for `pg_isready` to report the server accepting connections (a real
  readiness signal, no fixed sleep); `stop()` sends SIGINT (fast shutdown: it does not
  wait for clients to disconnect, as SIGTERM's smart shutdown would) to the postmaster
  by its PID, then SIGKILL to it and its children, and waits for the exit; `start()`
  again brings the same data back on the same port; `pause()`/`resume()` SIGSTOP and
  SIGCONT the postmaster and its children (a stalled database: connections are accepted
  by the kernel and never answered); `psql(sql)` runs SQL with the `psql` client of the
  same installation, so no Python driver is needed.

No pytest here (loadtest scripts may use it); failures raise `PgError`.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

START_DEADLINE_S = 60.0
STOP_GRACE_S = 15.0
OS_USER = "postgres"
DATABASE = "gateway"


class PgError(Exception):
    pass


def free_port() -> int:
    """A free loopback port (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _version_key(p: Path) -> tuple:
    # /usr/lib/postgresql/15/bin -> (15,); "9.6" -> (9, 6): the newest install wins.
    return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)


def bin_dir() -> Path:
    """The directory holding `initdb`, `postgres`, `pg_isready` and `psql`: `$PG_BIN_DIR`
    when set, else the newest /usr/lib/postgresql/*/bin (Debian's layout), else the
    directory of an `initdb` on PATH."""
    need = ("initdb", "postgres", "pg_isready", "psql")

    def complete(d: Path) -> bool:
        return all(os.access(d / n, os.X_OK) for n in need)

    if os.environ.get("PG_BIN_DIR"):
        d = Path(os.environ["PG_BIN_DIR"])
        if complete(d):
            return d
        raise PgError(f"PG_BIN_DIR={d} lacks one of {need}")
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True):
        if complete(d):
            return d
    on_path = shutil.which("initdb")
    if on_path and complete(Path(on_path).parent):
        return Path(on_path).parent
    raise PgError("PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin with "
                  f"{', '.join(need)}): tests/run.sh installs them (apt-get install postgresql)")


def available() -> bool:
    """Whether the server binaries are installed."""
    try:
        bin_dir()
        return True
    except PgError:
        return False


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc), children before grandchildren."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name (field 2) may hold spaces and parentheses: split after it.
        fields = text[text.rindex(")") + 2:].split()
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(0), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class PgServer:
    def __init__(self, directory: Path | None = None, database: str = DATABASE):
        """`directory` must be reachable by the `postgres` user when running as root;
        by default a fresh one under the system temp dir, removed by `cleanup()`."""
        self.owns_dir = directory is None
        self.dir = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="llmgw-pg-"))
        self.data = self.dir / "data"
        self.sock_dir = self.dir / "sock"
        self.log_path = self.dir / "postgres.log"
        self.database = database
        self.port = 0
        self.pid: int | None = None  # the postmaster
        self.paused = False
        self._proc: subprocess.Popen | None = None  # postgres, or runuser around it
        self._bin = bin_dir()
        self._as_root = os.geteuid() == 0

    # ------------------------------------------------------------------ addresses

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        return f"postgres://{OS_USER}@127.0.0.1:{self.port}/{database}"

    # ------------------------------------------------------------------ processes

    def _cmd(self, *args: str | Path) -> list[str]:
        cmd = [str(a) for a in args]
        return ["runuser", "-u", OS_USER, "--", *cmd] if self._as_root else cmd

    def _init(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sock_dir.mkdir(exist_ok=True)
        if self._as_root:
            try:
                pw = pwd.getpwnam(OS_USER)
            except KeyError:
                raise PgError(f"running as root and there is no '{OS_USER}' OS user to run "
                              "PostgreSQL as (Debian's postgresql package creates it)") from None
            for p in (self.dir, self.sock_dir):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        r = subprocess.run(
            self._cmd(self._bin / "initdb", "-D", self.data, "-U", OS_USER, "--auth=trust",
                      "-E", "UTF8", "--locale=C", "--no-sync"),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise PgError(f"initdb failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        # Trust, and only from this machine: the socket in the temp dir and 127.0.0.1.
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"\n# llm-gateway tests (tests/e2e/pgserver.py)\n"
                    f"listen_addresses = '127.0.0.1'\n"
                    f"port = {self.port}\n"
                    f"unix_socket_directories = '{self.sock_dir}'\n"
                    "fsync = off\n"  # test data: the page cache outlives a killed server
                    "max_connections = 200\n")

    def start(self) -> "PgServer":
        """Starts the server (creating the cluster and the database the first time) and
        returns once it accepts connections."""
        if self._proc is not None and self._proc.poll() is None:
            raise PgError("already running")
        first = not (self.data / "PG_VERSION").exists()
        if first:
            self.port = self.port or free_port()
            self._init()
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(self._cmd(self._bin / "postgres", "-D", self.data),
                                          stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          cwd=self.dir)
        self.paused = False
        self.pid = None
        deadline = time.monotonic() + START_DEADLINE_S
        last = "no answer"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PgError(f"postgres exited with {self._proc.returncode}:\n{self.logs()}")
            if self.pid is None:
                self.pid = self._postmaster_pid()
            r = subprocess.run([str(self._bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port),
                                "-d", "postgres", "-U", OS_USER, "-t", "1"],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
            # 0: accepting; 1: rejecting (starting up); 2: no response; 3: bad parameters.
            if r.returncode == 0 and self.pid is not None:
                if first:
                    self.psql(f'CREATE DATABASE "{self.database}"', database="postgres")
                return self
            if r.returncode == 3:
                raise PgError(f"pg_isready: bad parameters: {r.stderr!r}")
            last = f"pg_isready -> {r.returncode}"
            time.sleep(0.05)
        self.stop()
        raise PgError(f"postgres not ready within {START_DEADLINE_S}s ({last}):\n{self.logs()}")

    def _postmaster_pid(self) -> int | None:
        """The postmaster's PID from its lock file, once it wrote one for this run (not
        the runuser wrapper's, which does not pass SIGSTOP on)."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        if self._as_root:
            return pid if pid in _children(self._proc.pid) else None
        return pid if pid == self._proc.pid else None

    def stop(self) -> None:
        """Fast shutdown by PID (SIGINT), SIGKILL to the postmaster and its children after
        STOP_GRACE_S; returns once they are gone. The data stays for `start()`."""
        if self.paused:
            self.resume()
        proc, self._proc = self._proc, None
        if proc is None:
            return
        pid = self.pid or proc.pid
        if proc.poll() is None:
            _signal(pid, signal.SIGINT)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                for p in [pid, *_children(pid)]:
                    _signal(p, signal.SIGKILL)
                proc.wait(timeout=10)
        # Backends outlive a killed postmaster for a moment; the next start needs them gone.
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.pid = None

    def pause(self) -> None:
        """SIGSTOP the postmaster, then every child: the server holds its connections
        and accepts new ones into the kernel's backlog but answers nothing."""
        if self.pid is None:
            raise PgError("not running")
        _signal(self.pid, signal.SIGSTOP)
        for p in _children(self.pid):
            _signal(p, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.pid is None:
            return
        for p in _children(self.pid):
            _signal(p, signal.SIGCONT)
        _signal(self.pid, signal.SIGCONT)
        # runuser (like su) stops itself when its child stops, and would then never
        # reap it: it is continued too.
        if self._proc is not None and self._proc.pid != self.pid:
            _signal(self._proc.pid, signal.SIGCONT)
        self.paused = False

    def cleanup(self) -> None:
        """Stops the server and removes its directory when this object made it."""
        self.stop()
        if self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PgServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # ------------------------------------------------------------------ SQL

    def psql(self, sql: str, database: str | None = None, timeout: float = 10.0) -> str:
        """Runs `sql` (one or more statements) with `psql` over TCP and returns its
        unaligned, tuples-only output (`|` between columns). Raises `PgError` on an SQL
        error or when no answer comes within `timeout` (a paused server)."""
        cmd = [str(self._bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
               "-h", "127.0.0.1", "-p", str(self.port), "-U", OS_USER, "-d", database or self.database,
               "-c", sql]
        env = dict(os.environ, PGCONNECT_TIMEOUT=str(max(1, int(timeout))))
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise PgError(f"psql: no answer within {timeout}s to {sql!r}") from None
        if r.returncode != 0:
            raise PgError(f"psql {sql!r} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout.strip()

    def create_database(self, name: str) -> str:
        """Creates database `name` (a fresh one for a test sharing the server) and
        returns its URL."""
        self.psql(f'CREATE DATABASE "{name}"', database="postgres")
        return self.url_for(name)

    def logs(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"<cannot read {self.log_path}: {e}>"
