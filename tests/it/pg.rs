//! A private PostgreSQL server for the Rust integration tests, started the way
//! `tests/e2e/pgserver.py` starts one: a fresh cluster (`initdb`) in a temp dir, on a
//! free loopback port, trust authentication on 127.0.0.1 only, its unix socket in the
//! temp dir, a database `gateway`. `initdb` and `postgres` refuse root, so under root
//! they run as the `postgres` OS user (`runuser -u postgres --`) in a directory that
//! user owns; the postmaster is then signalled by the PID in its `postmaster.pid`, not
//! through runuser (which would not pass SIGSTOP on, and leaves it behind if killed).
//!
//! The binaries are Debian's (`/usr/lib/postgresql/<version>/bin`, found by glob;
//! tests/run.sh installs `postgresql`), or `$PG_BIN_DIR`. [`PgServer::start`] gives
//! `None` only when they are absent, after printing why, so a test then returns early:
//! the one case where a missing server skips instead of failing.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const OS_USER: &str = "postgres";
const DATABASE: &str = "gateway";
const START_DEADLINE: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(15);

/// A private PostgreSQL server; stopped and its directory removed when dropped.
pub struct PgServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_root: bool,
    /// `postgres`, or the `runuser` around it.
    child: Option<Child>,
    /// The postmaster's PID while it runs.
    pid: Option<u32>,
}

/// The newest directory holding the server binaries the helper runs.
fn bin_dir() -> Option<PathBuf> {
    let complete = |d: &Path| {
        ["initdb", "postgres", "pg_isready", "psql"]
            .iter()
            .all(|b| d.join(b).is_file())
    };
    if let Some(d) = std::env::var_os("PG_BIN_DIR").map(PathBuf::from) {
        // Named on purpose: a wrong one is a mistake to report, not a reason to skip.
        assert!(
            complete(&d),
            "PG_BIN_DIR={} lacks the server binaries",
            d.display()
        );
        return Some(d);
    }
    let mut found: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e
                .file_name()
                .to_str()?
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            let d = e.path().join("bin");
            complete(&d).then_some((version, d))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, d)| d)
}

/// Whether this process runs as root (its effective uid, from /proc).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let uids = s.lines().find(|l| l.starts_with("Uid:"))?.to_string();
            Some(uids.split_whitespace().nth(2)? == "0")
        })
        .unwrap_or(false)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Sends `sig` (a name such as `INT`, `KILL`, `STOP`) to `pid`; no libc in this crate.
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Whether `pid` still runs (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().next()? != "Z"))
        .unwrap_or(false)
}

/// Every descendant of `pid`, from /proc.
fn descendants(pid: u32) -> Vec<u32> {
    let mut edges = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        if let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
        {
            edges.push((ppid, child));
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for &(_, c) in edges.iter().filter(|(pp, _)| *pp == p) {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

impl PgServer {
    /// A new cluster, started and accepting connections, with the database `gateway`;
    /// `None` (after printing why) when the PostgreSQL binaries are not installed.
    /// Any other failure panics with the server's log.
    pub fn start() -> Option<PgServer> {
        let Some(bin) = bin_dir() else {
            eprintln!(
                "SKIPPED: no PostgreSQL server binaries (/usr/lib/postgresql/*/bin or \
                 $PG_BIN_DIR); tests/run.sh installs them (apt-get install postgresql)"
            );
            return None;
        };
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("llmgw-pg-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sock")).expect("postgres temp dir");
        let mut pg = PgServer {
            bin,
            dir,
            port,
            as_root: is_root(),
            child: None,
            pid: None,
        };
        pg.init();
        pg.spawn();
        pg.psql("postgres", &format!("CREATE DATABASE {DATABASE}"));
        Some(pg)
    }

    /// `postgres://postgres@127.0.0.1:PORT/gateway`.
    pub fn url(&self) -> String {
        format!("postgres://{OS_USER}@127.0.0.1:{}/{DATABASE}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `program` from the bin dir as a command, run as the `postgres` user when this process is root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", OS_USER, "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn init(&self) {
        if self.as_root {
            let ok = Command::new("chown")
                .args(["-R", OS_USER])
                .arg(&self.dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "cannot give {} to the '{OS_USER}' user (is there one?)",
                self.dir.display()
            );
        }
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args([
                "-U",
                OS_USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let data = self.dir.join("data");
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.1/32 trust\n",
        )
        .expect("pg_hba.conf");
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("postgresql.conf");
        write!(
            conf,
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             fsync = off\n",
            self.port,
            self.dir.join("sock").display()
        )
        .expect("postgresql.conf");
    }

    /// Starts the postmaster on the existing cluster and waits until `pg_isready`
    /// reports it accepting connections (no fixed sleep).
    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("postgres.log")).expect("postgres log");
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.dir.join("data"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn postgres");
        let wrapper = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "postgres exited ({status}) before it was ready:\n{}",
                        self.log()
                    );
                }
            }
            if self.pid.is_none() {
                self.pid = self.postmaster_pid(wrapper);
            }
            let ready = self.pid.is_some()
                && Command::new(self.bin.join("pg_isready"))
                    .args(["-q", "-h", "127.0.0.1", "-t", "1", "-U", OS_USER])
                    .args(["-d", "postgres", "-p", &self.port.to_string()])
                    .status()
                    .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres not ready within {START_DEADLINE:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The postmaster's PID from `postmaster.pid`, once this run wrote it.
    fn postmaster_pid(&self, wrapper: u32) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).ok()?;
        let pid: u32 = text.lines().next()?.trim().parse().ok()?;
        let ours = if self.as_root {
            descendants(wrapper).contains(&pid)
        } else {
            pid == wrapper
        };
        ours.then_some(pid)
    }

    /// Fast shutdown (SIGINT to the postmaster), SIGKILL to it and its children after
    /// a grace period; returns once they are gone. The data stays for [`Self::restart`].
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = self.pid.take().unwrap_or(child.id());
        // A paused server cannot shut down: continue it (and runuser) first.
        self.signal_all(pid, "CONT");
        signal(child.id(), "CONT");
        signal(pid, "INT");
        let deadline = Instant::now() + STOP_GRACE;
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() >= deadline {
                self.signal_all(pid, "KILL");
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same data and port, after [`Self::stop`].
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// SIGSTOP to the postmaster and its children: a stalled database, whose port
    /// accepts connections (the kernel's backlog) and never answers.
    pub fn pause(&self) {
        if let Some(pid) = self.pid {
            signal(pid, "STOP");
            for c in descendants(pid) {
                signal(c, "STOP");
            }
        }
    }

    /// Undoes [`Self::pause`].
    pub fn resume(&self) {
        if let Some(pid) = self.pid {
            self.signal_all(pid, "CONT");
        }
        // runuser stops itself when its child stops; it must go on to reap it.
        if let Some(c) = &self.child {
            signal(c.id(), "CONT");
        }
    }

    fn signal_all(&self, pid: u32, sig: &str) {
        for c in descendants(pid) {
            signal(c, sig);
        }
        signal(pid, sig);
    }

    /// Runs `sql` in `database` with `psql` and returns its unaligned output; panics
    /// when it fails.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-U",
                OS_USER,
                "-p",
                &self.port.to_string(),
                "-d",
                database,
                "-c",
                sql,
            ])
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads one backend message: its type byte and body.
fn message(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    s.read_exact(&mut body)?;
    Ok((head[0], body))
}

/// Speaks the start of the wire protocol by hand over a raw TCP connection (no
/// driver): a startup message for `postgres` on `gateway` must get AuthenticationOk
/// (trust), then ReadyForQuery; a paused server leaves it unanswered until resumed; a
/// stopped server refuses the connection, a restarted one answers again on the same
/// port with its data.
#[test]
fn a_private_postgres_answers_the_wire_protocol_and_survives_a_restart() {
    let Some(mut pg) = PgServer::start() else {
        return;
    };
    assert_eq!(
        pg.url(),
        format!("postgres://postgres@127.0.0.1:{}/gateway", pg.port())
    );
    let handshake = |port: u16, wait: Duration| -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(wait))?;
        let mut params = Vec::new();
        for (k, v) in [("user", OS_USER), ("database", DATABASE)] {
            params.extend_from_slice(k.as_bytes());
            params.push(0);
            params.extend_from_slice(v.as_bytes());
            params.push(0);
        }
        params.push(0);
        let mut startup = ((params.len() + 8) as u32).to_be_bytes().to_vec();
        startup.extend_from_slice(&196_608u32.to_be_bytes()); // protocol 3.0
        startup.extend_from_slice(&params);
        s.write_all(&startup)?;
        let mut kinds = Vec::new();
        loop {
            let (kind, body) = message(&mut s)?;
            if kind == b'R' {
                assert_eq!(body, 0u32.to_be_bytes(), "AuthenticationOk (trust)");
            }
            assert_ne!(kind, b'E', "error: {}", String::from_utf8_lossy(&body));
            kinds.push(kind);
            if kind == b'Z' {
                return Ok(kinds);
            }
        }
    };
    let kinds = handshake(pg.port(), Duration::from_secs(5)).expect("the server answers");
    assert_eq!(kinds.first(), Some(&b'R'), "{kinds:?}");

    // Paused: the connection is accepted (the kernel's backlog), the answer never comes.
    pg.pause();
    let stalled = handshake(pg.port(), Duration::from_millis(1500));
    assert!(
        stalled.as_ref().is_err_and(|e| matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )),
        "{stalled:?}"
    );
    pg.resume();
    handshake(pg.port(), Duration::from_secs(5)).expect("answers once resumed");

    pg.psql(
        DATABASE,
        "CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)",
    );
    let port = pg.port();
    pg.stop();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "a stopped server refuses connections"
    );
    pg.restart();
    assert_eq!(pg.port(), port);
    let kinds = handshake(port, Duration::from_secs(5)).expect("answers again");
    assert_eq!(kinds.last(), Some(&b'Z'));
    assert_eq!(pg.psql(DATABASE, "SELECT x FROM kept"), "42");
}
