//! The single-valued sections: node, listeners, admin, counters, cache and audit.
//!
//! Each function returns `None` only after reporting why, so the caller can tell a
//! broken section from a valid one without re-checking.

use super::net::{base_url, socket_addr};
use super::raw::{
    RawAdmin, RawAudit, RawBackend, RawCache, RawCounters, RawListen, RawNode, RawOnError,
    RawStore, RawStoreBackend, Sec,
};
use super::report::{child, Report};
use super::{
    Admin, AuditConf, CacheConf, ClickHouseConf, Counters, Https, Listen, Node, OnError,
    StoreBackend, StoreConf,
};
use std::env::VarError;
use std::path::PathBuf;

const DEFAULT_MAX_BODY_BYTES: u64 = 4 * 1024 * 1024;
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

/// Reads a secret named by a `*_env` key. The value never appears in a message, and
/// anything that could not be sent in an HTTP header is refused here rather than on
/// every request.
pub(super) fn env_secret(var: &str) -> Result<String, String> {
    if var.trim().is_empty() {
        return Err("the environment variable name is empty".into());
    }
    match std::env::var(var) {
        Ok(v) => {
            let v = v.trim();
            if v.is_empty() {
                Err(format!("environment variable {var} is empty"))
            } else if !v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                Err(format!(
                    "environment variable {var} holds characters that cannot be sent in an HTTP header"
                ))
            } else {
                Ok(v.to_string())
            }
        }
        Err(VarError::NotPresent) => Err(format!("environment variable {var} is not set")),
        Err(VarError::NotUnicode(_)) => Err(format!("environment variable {var} is not UTF-8")),
    }
}

fn missing(report: &mut Report, section: &str, what: &str) {
    report.error(section, format!("required section is missing ({what})"));
}

pub(super) fn node(sec: Sec<RawNode>, report: &mut Report) -> Option<Node> {
    let raw = match sec {
        Sec::Valid(r) => r,
        Sec::Invalid => return None,
        Sec::Absent => {
            missing(report, "node", "node.region names this edge node's region");
            return None;
        }
    };
    let region = raw.region.trim().to_string();
    if region.is_empty() {
        report.error("node.region", "must not be empty");
        return None;
    }
    Some(Node {
        region,
        hostname: hostname(),
    })
}

fn hostname() -> String {
    let non_empty = |s: String| Some(s.trim().to_string()).filter(|s| !s.is_empty());
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .and_then(non_empty)
        .or_else(|| std::env::var("HOSTNAME").ok().and_then(non_empty))
        .unwrap_or_else(|| "unknown".to_string())
}

pub(super) fn listen(sec: Sec<RawListen>, report: &mut Report) -> Option<Listen> {
    let raw = match sec {
        Sec::Valid(r) => r,
        Sec::Invalid => return None,
        Sec::Absent => {
            missing(report, "listen", "give listen.http and/or listen.https");
            return None;
        }
    };
    let mut ok = true;
    let http = match raw.http.as_deref().map(socket_addr) {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(e)) => {
            report.error("listen.http", e);
            ok = false;
            None
        }
    };
    let https = match raw.https {
        None => None,
        Some(h) => {
            for (key, file) in [("cert", &h.cert), ("key", &h.key)] {
                if !file.is_file() {
                    report.warn(
                        format!("listen.https.{key}"),
                        format!("{} does not exist (yet): serving will fail", file.display()),
                    );
                }
            }
            match socket_addr(&h.addr) {
                Ok(addr) => Some(Https {
                    addr,
                    cert: h.cert,
                    key: h.key,
                }),
                Err(e) => {
                    report.error("listen.https.addr", e);
                    ok = false;
                    None
                }
            }
        }
    };
    if ok && http.is_none() && https.is_none() {
        report.error(
            "listen",
            "give at least one of listen.http and listen.https",
        );
        return None;
    }
    if let (Some(a), Some(b)) = (&http, &https) {
        if *a == b.addr {
            report.error("listen.https.addr", format!("{a} is already listen.http"));
            ok = false;
        }
    }
    ok.then_some(Listen { http, https })
}

pub(super) fn admin(sec: Sec<RawAdmin>, report: &mut Report) -> Option<Admin> {
    let raw = match sec {
        Sec::Valid(r) => r,
        Sec::Invalid => return None,
        Sec::Absent => RawAdmin {
            listen: None,
            token_env: None,
        },
    };
    let token = raw
        .token_env
        .as_deref()
        .and_then(|var| match env_secret(var) {
            Ok(t) => Some(t),
            Err(why) => {
                report.warn(
                    "admin.token_env",
                    format!("{why}: no admin token is configured"),
                );
                None
            }
        });
    let listen = match socket_addr(raw.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN)) {
        Ok(a) => a,
        Err(e) => {
            report.error("admin.listen", e);
            return None;
        }
    };
    if token.is_none() && !listen.ip().is_loopback() {
        report.warn(
            "admin.listen",
            format!("{listen} is reachable from other machines and no admin token is configured"),
        );
    }
    Some(Admin { listen, token })
}

pub(super) fn max_body_bytes(sec: Sec<u64>, report: &mut Report) -> Option<usize> {
    let n = match sec {
        Sec::Valid(n) => n,
        Sec::Invalid => return None,
        Sec::Absent => DEFAULT_MAX_BODY_BYTES,
    };
    if n == 0 {
        report.error("max_body_bytes", "must be greater than 0");
        return None;
    }
    if n < 64 * 1024 {
        report.warn(
            "max_body_bytes",
            format!("{n} is below 64 KiB: ordinary long prompts will be refused with 413"),
        );
    }
    match usize::try_from(n) {
        Ok(n) => Some(n),
        Err(_) => {
            report.error(
                "max_body_bytes",
                format!("{n} is too large for this machine"),
            );
            None
        }
    }
}

pub(super) fn counters(sec: Sec<RawCounters>, report: &mut Report) -> Option<Counters> {
    let raw = match sec {
        Sec::Valid(r) => r,
        Sec::Invalid => return None,
        Sec::Absent => return Some(Counters::Memory),
    };
    let on_error = match raw.on_error {
        Some(RawOnError::FailOpen) => OnError::FailOpen,
        Some(RawOnError::FailClosed) | None => OnError::FailClosed,
    };
    match raw.backend {
        RawBackend::Memory => {
            if raw.url.is_some() {
                report.warn("counters.url", "ignored: backend is memory");
            }
            Some(Counters::Memory)
        }
        RawBackend::Redis => {
            let Some(url) = raw.url else {
                report.error(
                    "counters.url",
                    "backend redis needs a url, e.g. redis://127.0.0.1:6379",
                );
                return None;
            };
            let url = url.trim().to_string();
            let known = ["redis://", "rediss://", "redis+unix://", "unix://"];
            if !known.iter().any(|s| url.starts_with(s)) {
                report.error(
                    "counters.url",
                    format!("`{url}` is not a Redis URL (redis://, rediss:// or unix://)"),
                );
                return None;
            }
            Some(Counters::Redis { url, on_error })
        }
    }
}

pub(super) fn cache(sec: Sec<RawCache>) -> Option<CacheConf> {
    match sec {
        Sec::Valid(r) => Some(CacheConf {
            max_bytes: r.max_bytes,
        }),
        Sec::Invalid => None,
        Sec::Absent => Some(CacheConf {
            max_bytes: 256 * 1024 * 1024,
        }),
    }
}

pub(super) fn audit(sec: Sec<RawAudit>, report: &mut Report) -> Option<AuditConf> {
    let raw = match sec {
        Sec::Valid(r) => r,
        Sec::Invalid => return None,
        Sec::Absent => {
            return Some(AuditConf {
                spool_dir: "./data/spool".into(),
                clickhouse: None,
            })
        }
    };
    let mut ok = true;
    if raw.spool_dir.as_os_str().is_empty() {
        report.error("audit.spool_dir", "must not be empty");
        ok = false;
    }
    let clickhouse = match raw.clickhouse {
        None => None,
        Some(ch) => {
            let at = "audit.clickhouse";
            let mut err = |key: &str, msg: String| {
                report.error(child(at, key), msg);
                ok = false;
            };
            let url = match base_url(&ch.url) {
                Ok(u) => u.original.trim_end_matches('/').to_string(),
                Err(e) => {
                    err("url", e);
                    String::new()
                }
            };
            for (key, value) in [("database", &ch.database), ("table", &ch.table)] {
                if !is_identifier(value) {
                    err(
                        key,
                        format!(
                            "`{value}` must be letters, digits and underscores (it goes into SQL)"
                        ),
                    );
                }
            }
            if ch.user.trim().is_empty() {
                err("user", "must not be empty".into());
            }
            let password = match ch.password_env.as_deref().map(env_secret) {
                None => None,
                Some(Ok(p)) => Some(p),
                Some(Err(e)) => {
                    err("password_env", e);
                    None
                }
            };
            let batch_rows = match usize::try_from(ch.batch_rows) {
                Ok(n) if n > 0 => n,
                _ => {
                    err(
                        "batch_rows",
                        format!("{} must be from 1 to {}", ch.batch_rows, usize::MAX),
                    );
                    0
                }
            };
            if ch.flush_ms == 0 {
                err("flush_ms", "must be greater than 0".into());
            }
            Some(ClickHouseConf {
                url,
                database: ch.database,
                table: ch.table,
                user: ch.user,
                password,
                batch_rows,
                flush_ms: ch.flush_ms,
            })
        }
    };
    ok.then_some(AuditConf {
        spool_dir: raw.spool_dir,
        clickhouse,
    })
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub(super) fn store(sec: Sec<RawStore>, report: &mut Report) -> Option<Option<StoreConf>> {
    let raw = match sec {
        Sec::Valid(r) => r,
        Sec::Invalid => return None,
        Sec::Absent => return Some(None),
    };
    let sync_ms = raw.sync_ms.unwrap_or(1_000);
    if sync_ms == 0 {
        report.error("store.sync_ms", "must be greater than 0");
        return None;
    }
    let backend = match raw.backend {
        RawStoreBackend::Sqlite => {
            if raw.url_env.is_some() {
                report.warn("store.url_env", "ignored: backend is sqlite");
            }
            StoreBackend::Sqlite {
                path: raw
                    .path
                    .unwrap_or_else(|| PathBuf::from("./data/tenants.db")),
            }
        }
        RawStoreBackend::Postgres => {
            if raw.path.is_some() {
                report.warn("store.path", "ignored: backend is postgres");
            }
            let Some(var) = raw.url_env else {
                report.error(
                    "store.url_env",
                    "backend postgres needs url_env: the environment variable holding postgres://user:pass@host:port/db",
                );
                return None;
            };
            match env_secret(&var) {
                Ok(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                    StoreBackend::Postgres { url }
                }
                Ok(_) => {
                    report.error(
                        "store.url_env",
                        format!("environment variable {var} does not hold a postgres:// URL"),
                    );
                    return None;
                }
                Err(e) => {
                    report.error("store.url_env", e);
                    return None;
                }
            }
        }
    };
    Some(Some(StoreConf {
        backend,
        sync_ms,
        snapshot: raw.snapshot,
    }))
}
