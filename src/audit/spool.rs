//! The append-only local spool: JSON lines, one file per UTC hour.
//!
//! A row is written (`write(2)`, in the page cache) before the response it records
//! ends, and fsynced within 100 ms. With no ClickHouse configured
//! the spool is the audit log itself, readable with standard tools (`jq`, `grep`,
//! `wc -l`); with ClickHouse it is the durable buffer the shipper reads from
//! (`reader.rs`), so a row is on disk before anything tries to ship it.

use super::time::{hour_stamp, now_ms};
use super::AuditRow;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub struct Spool {
    dir: PathBuf,
    current: Option<(String, File)>,
    /// The newest hour stamp written (or found on disk at start). Files are never
    /// reopened below it, so a clock stepping back cannot put rows behind the
    /// shipper's cursor.
    floor: String,
}

/// Whether `name` is a spool file (`audit-YYYYMMDDHH.jsonl`).
pub fn is_spool_file(name: &str) -> bool {
    name.starts_with("audit-") && name.ends_with(".jsonl")
}

/// The spool's files, oldest first (names sort by hour).
pub fn list_files(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| is_spool_file(n))
        .collect();
    names.sort();
    Ok(names)
}

/// Bytes held by the spool's files.
pub fn total_bytes(dir: &Path) -> u64 {
    list_files(dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|n| std::fs::metadata(dir.join(n)).ok())
        .map(|m| m.len())
        .sum()
}

/// Ends a file whose last line was torn (a crash mid-write) with a newline, so the
/// next row appended starts a line of its own instead of being glued to the fragment;
/// the fragment is then one corrupt line that readers skip. Returns whether it did.
fn terminate_torn_tail(path: &Path) -> std::io::Result<bool> {
    let mut f = OpenOptions::new().read(true).append(true).open(path)?;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(false);
    }
    f.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(false);
    }
    f.write_all(b"\n")?;
    f.sync_data()?;
    Ok(true)
}

impl Spool {
    /// Opens the spool directory, creating it, and repairs torn last lines left by a
    /// crash so the rows written from now on are readable.
    pub fn open(dir: &Path) -> std::io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        let files = list_files(dir)?;
        for name in &files {
            if terminate_torn_tail(&dir.join(name))? {
                log::warn!(
                    "audit spool: {} ended in a torn line (crash mid-write?); terminated it, \
                     readers skip it as one corrupt line",
                    dir.join(name).display()
                );
            }
        }
        let floor = files
            .last()
            .map(|n| n["audit-".len()..n.len() - ".jsonl".len()].to_string())
            .unwrap_or_default();
        Ok(Spool {
            dir: dir.to_path_buf(),
            current: None,
            floor,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `rows` to the current hour's file and fsyncs it (tests and tools; the
    /// gateway's writer uses [`Spool::append_lines`] and syncs on its own clock).
    pub fn append(&mut self, rows: &[AuditRow]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(rows.len() * 512);
        for r in rows {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        self.append_lines(&buf)?;
        self.sync()
    }

    /// Appends whole JSON lines to the current hour's file with one `write`, and no
    /// fsync: once the call returns the bytes are in the kernel's page cache, which
    /// outlives the process (a crash, `kill -9`, an OOM kill), so the row is safe from
    /// everything but the machine itself going down; [`Spool::sync`] covers that on a
    /// timer, off the path a response waits on.
    pub fn append_lines(&mut self, lines: &[u8]) -> std::io::Result<()> {
        let now = hour_stamp(now_ms());
        if now > self.floor {
            self.floor = now;
        }
        if self.current.as_ref().is_none_or(|(s, _)| *s != self.floor) {
            // The hour's last rows are made durable before the file is left behind.
            self.sync()?;
            let path = self.dir.join(format!("audit-{}.jsonl", self.floor));
            let f = OpenOptions::new().create(true).append(true).open(path)?;
            self.current = Some((self.floor.clone(), f));
        }
        if let Some((_, f)) = self.current.as_mut() {
            f.write_all(lines)?;
        }
        Ok(())
    }

    /// A second handle on the file being appended to, for syncing it without holding
    /// the spool (an fsync can take milliseconds, and writers wait on the spool).
    pub fn current_file(&self) -> Option<File> {
        self.current.as_ref().and_then(|(_, f)| f.try_clone().ok())
    }

    /// fsyncs the file being appended to.
    pub fn sync(&mut self) -> std::io::Result<()> {
        match self.current.as_ref() {
            Some((_, f)) => f.sync_data(),
            None => Ok(()),
        }
    }
}

/// Rows of `tenant` since `since_ms`, oldest first, at most `limit`: the audit query
/// when the spool is the audit log (no ClickHouse). Reads only the hourly files that
/// can hold such rows; corrupt lines are skipped.
pub fn query(
    dir: &Path,
    tenant: &str,
    since_ms: u64,
    limit: usize,
) -> std::io::Result<Vec<serde_json::Value>> {
    let first_file = format!("audit-{}.jsonl", hour_stamp(since_ms));
    let mut out = Vec::new();
    for name in list_files(dir)? {
        if name < first_file {
            continue;
        }
        let text = match std::fs::read_to_string(dir.join(&name)) {
            Ok(t) => t,
            // Shipped and removed by the ClickHouse shipper meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_tail_is_terminated_at_open_and_new_rows_start_a_line() {
        let dir = std::env::temp_dir().join(format!("llmgw-spool-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let old = dir.join("audit-2020010100.jsonl");
        std::fs::write(&old, b"{\"request_id\":\"a\"}\n{\"request_id\":\"b").unwrap();
        let mut spool = Spool::open(&dir).unwrap();
        assert_eq!(
            std::fs::read(&old).unwrap(),
            b"{\"request_id\":\"a\"}\n{\"request_id\":\"b\n"
        );
        spool
            .append(&[AuditRow {
                request_id: "c".into(),
                ..AuditRow::default()
            }])
            .unwrap();
        let files = list_files(&dir).unwrap();
        assert_eq!(files.len(), 2, "{files:?}");
        let new = std::fs::read_to_string(dir.join(&files[1])).unwrap();
        assert!(new.starts_with("{\"request_id\":\"c\""), "{new}");
        assert!(total_bytes(&dir) > 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
