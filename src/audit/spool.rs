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
