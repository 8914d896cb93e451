//! The append-only local spool: JSON lines, one file per UTC hour.
//!
//! With no ClickHouse configured it is the audit log itself, readable with standard
//! tools (`jq`, `grep`, `wc -l`); every batch is fsynced before it counts as written.

use super::time::{hour_stamp, now_ms};
use super::AuditRow;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct Spool {
    dir: PathBuf,
    current: Option<(String, File)>,
    buf: Vec<u8>,
}

impl Spool {
    pub fn open(dir: &Path) -> std::io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        Ok(Spool {
            dir: dir.to_path_buf(),
            current: None,
            buf: Vec::with_capacity(64 << 10),
        })
    }

    /// The file rows written now go to.
    pub fn path_for(dir: &Path, ts_ms: u64) -> PathBuf {
        dir.join(format!("audit-{}.jsonl", hour_stamp(ts_ms)))
    }

    pub fn append(&mut self, rows: &[AuditRow]) -> std::io::Result<()> {
        self.buf.clear();
        for r in rows {
            serde_json::to_writer(&mut self.buf, r)?;
            self.buf.push(b'\n');
        }
        let stamp = hour_stamp(now_ms());
        if self.current.as_ref().is_none_or(|(s, _)| *s != stamp) {
            let path = self.dir.join(format!("audit-{stamp}.jsonl"));
            let f = OpenOptions::new().create(true).append(true).open(path)?;
            self.current = Some((stamp, f));
        }
        if let Some((_, f)) = self.current.as_mut() {
            f.write_all(&self.buf)?;
            f.sync_data()?;
        }
        Ok(())
    }
}

/// Rows of `tenant` since `since_ms`, oldest first, at most `limit`: the audit query
/// when the spool is the audit log (no ClickHouse). Reads only the hourly files that
/// can hold such rows.
pub fn query(
    dir: &Path,
    tenant: &str,
    since_ms: u64,
    limit: usize,
) -> std::io::Result<Vec<serde_json::Value>> {
    let first_file = format!("audit-{}.jsonl", hour_stamp(since_ms));
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("audit-") && n.ends_with(".jsonl") && *n >= *first_file.as_str()
            })
        })
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["tenant"] == tenant && v["ts_ms"].as_u64().is_some_and(|t| t >= since_ms) {
                out.push(v);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
    }
    Ok(out)
}
