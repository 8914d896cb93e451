//! Reading the spool for the ClickHouse shipper, from a persisted cursor.
//!
//! The cursor (`<spool_dir>/clickhouse.cursor`: a file name and a byte offset) moves
//! only after ClickHouse acknowledged the rows before it, and is replaced atomically
//! (write, fsync, rename, fsync the directory), so a crash at any point replays at
//! most the last batch; the table's dedupe collapses the replay. Files wholly behind
//! the cursor are deleted.
//!
//! Only lines ending in `\n` are read: the writer may be in the middle of the newest
//! file's last line. A line that does not parse (a torn write terminated at start-up,
//! or damage) is skipped with a log line and counted, once; the rest of the file still
//! ships.

use super::spool::list_files;
use super::AuditRow;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const CURSOR_FILE: &str = "clickhouse.cursor";
/// Bytes read from a spool file at a time.
const READ_CHUNK: usize = 1 << 20;

/// A position in the spool: the next byte to ship.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    pub file: String,
    pub offset: u64,
}

/// Rows read from the cursor on, not yet shipped.
#[derive(Debug, Default)]
pub struct Batch {
    pub rows: Vec<AuditRow>,
    /// Where the cursor goes once `rows` are acknowledged.
    pub end: Cursor,
    /// Corrupt lines met for the first time in this read.
    pub corrupt: u64,
}

impl Batch {
    /// Whether committing `end` would move the cursor (rows or skipped lines).
    pub fn moves(&self, from: &Cursor) -> bool {
        self.end != *from
    }
}

pub struct SpoolReader {
    dir: PathBuf,
    cursor: Cursor,
    /// Corrupt lines before this position were already reported.
    reported: Cursor,
    buf: Vec<u8>,
}

fn parse_cursor(text: &str) -> Option<Cursor> {
    let (file, offset) = text.trim().rsplit_once(' ')?;
    super::spool::is_spool_file(file).then_some(())?;
    Some(Cursor {
        file: file.to_string(),
        offset: offset.parse().ok()?,
    })
}

impl SpoolReader {
    /// Opens the reader at the persisted cursor; without one (first start, or a file
    /// that cannot be read) it starts at the oldest spool file, which at worst ships
    /// rows again.
    pub fn open(dir: &Path) -> SpoolReader {
        let path = dir.join(CURSOR_FILE);
        let cursor = match std::fs::read_to_string(&path) {
            Ok(text) => parse_cursor(&text).unwrap_or_else(|| {
                log::error!(
                    "audit: cursor {} is unreadable ({:?}); shipping the spool from its start \
                     (duplicates collapse in the table)",
                    path.display(),
                    text.trim()
                );
                Cursor::default()
            }),
            Err(_) => Cursor::default(),
        };
        SpoolReader {
            dir: dir.to_path_buf(),
            reported: cursor.clone(),
            cursor,
            buf: Vec::new(),
        }
    }

    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// Bytes of spool not yet shipped.
    pub fn pending_bytes(&self) -> u64 {
        let Ok(files) = list_files(&self.dir) else {
            return 0;
        };
        files
            .iter()
            .filter(|n| **n >= self.cursor.file)
            .filter_map(|n| Some((n, std::fs::metadata(self.dir.join(n)).ok()?.len())))
            .map(|(n, len)| {
                if *n == self.cursor.file {
                    len.saturating_sub(self.cursor.offset)
                } else {
                    len
                }
            })
            .sum()
    }

    /// Up to `max_rows` rows from the cursor on, without moving it.
    pub fn read(&mut self, max_rows: usize) -> std::io::Result<Batch> {
        let mut batch = Batch {
            end: self.cursor.clone(),
            ..Batch::default()
        };
        self.fill(&mut batch, max_rows)?;
        Ok(batch)
    }

    /// Adds rows after `batch.end` to `batch` until it holds `max_rows` or the spool
    /// has no complete line left; a batch waiting for `flush_ms` grows this way
    /// without reading its rows again.
    pub fn fill(&mut self, batch: &mut Batch, max_rows: usize) -> std::io::Result<()> {
        if batch.rows.len() >= max_rows {
            return Ok(());
        }
        // List before reading: the writer only creates a newer file after its last
        // write to the older ones, so a file read to its end after a newer file was
        // seen is complete.
        let files = list_files(&self.dir)?;
        let mut idx = match files.iter().position(|f| *f >= batch.end.file) {
            Some(i) => i,
            None => return Ok(()),
        };
        if files[idx] != batch.end.file {
            // The cursor's file is gone (shipped by a previous process and removed).
            batch.end = Cursor {
                file: files[idx].clone(),
                offset: 0,
            };
        }
        loop {
            let last = idx + 1 == files.len();
            let at_end = self.read_file(batch, max_rows, last)?;
            if !at_end || last || batch.rows.len() >= max_rows {
                return Ok(());
            }
            idx += 1;
            batch.end = Cursor {
                file: files[idx].clone(),
                offset: 0,
            };
        }
    }

    /// Reads complete lines of `batch.end.file` from `batch.end.offset`; returns
    /// whether the whole file was consumed.
    fn read_file(
        &mut self,
        batch: &mut Batch,
        max_rows: usize,
        last: bool,
    ) -> std::io::Result<bool> {
        let path = self.dir.join(&batch.end.file);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(e),
        };
        f.seek(SeekFrom::Start(batch.end.offset))?;
        self.buf.clear();
        let mut eof = false;
        loop {
            // Consume the complete lines buffered so far.
            let mut start = 0;
            while batch.rows.len() < max_rows {
                let Some(nl) = self.buf[start..].iter().position(|b| *b == b'\n') else {
                    break;
                };
                let line = &self.buf[start..start + nl];
                let at = batch.end.clone();
                match serde_json::from_slice::<AuditRow>(line) {
                    Ok(row) => batch.rows.push(row),
                    Err(e) => self.corrupt(batch, &at, line.len(), &e.to_string()),
                }
                start += nl + 1;
                batch.end.offset += nl as u64 + 1;
            }
            self.buf.drain(..start);
            if batch.rows.len() >= max_rows {
                return Ok(false);
            }
            if eof {
                break;
            }
            let old = self.buf.len();
            self.buf.resize(old + READ_CHUNK, 0);
            let n = f.read(&mut self.buf[old..])?;
            self.buf.truncate(old + n);
            eof = n == 0;
        }
        if self.buf.is_empty() {
            return Ok(true);
        }
        if last {
            // The writer may be finishing this line: wait for its newline.
            return Ok(false);
        }
        // A newer file exists, so nobody writes here any more: a torn last line.
        let at = batch.end.clone();
        let len = self.buf.len();
        self.corrupt(batch, &at, len, "no newline at the end of the file");
        batch.end.offset += len as u64;
        self.buf.clear();
        Ok(true)
    }

    fn corrupt(&mut self, batch: &mut Batch, at: &Cursor, len: usize, why: &str) {
        if *at < self.reported {
            return;
        }
        self.reported = Cursor {
            file: at.file.clone(),
            offset: at.offset + 1,
        };
        batch.corrupt += 1;
        log::error!(
            "audit spool: skipping a corrupt line of {len} bytes at {}:{} ({why}); the rest \
             of the file ships",
            self.dir.join(&at.file).display(),
            at.offset
        );
    }

    /// Moves the cursor to `end` (ClickHouse acknowledged everything before it),
    /// persists it and deletes the spool files wholly behind it. The cursor moves in
    /// memory even when persisting fails, so rows already shipped are not shipped
    /// again and again; a restart then replays them once.
    pub fn commit(&mut self, end: Cursor) -> std::io::Result<()> {
        if self.reported < end {
            self.reported = end.clone();
        }
        self.cursor = end.clone();
        let tmp = self.dir.join(format!("{CURSOR_FILE}.tmp"));
        {
            let mut f = File::create(&tmp)?;
            writeln!(f, "{} {}", end.file, end.offset)?;
            f.sync_data()?;
        }
        std::fs::rename(&tmp, self.dir.join(CURSOR_FILE))?;
        File::open(&self.dir)?.sync_all()?;
        for name in list_files(&self.dir)? {
            if name >= end.file {
                break;
            }
            match std::fs::remove_file(self.dir.join(&name)) {
                Ok(()) => log::info!("audit spool: {name} shipped to ClickHouse, removed"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("audit spool: cannot remove shipped {name}: {e}"),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> String {
        let r = AuditRow {
            request_id: id.into(),
            ..AuditRow::default()
        };
        serde_json::to_string(&r).unwrap() + "\n"
    }

    fn ids(b: &Batch) -> Vec<&str> {
        b.rows.iter().map(|r| r.request_id.as_str()).collect()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("llmgw-reader-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn reads_in_batches_across_files_skips_corrupt_lines_and_resumes_from_the_cursor() {
        let dir = temp_dir("batches");
        let a = format!("{}{}{{\"broken\n{}", row("1"), row("2"), row("3"));
        std::fs::write(dir.join("audit-2026010100.jsonl"), a).unwrap();
        // A torn tail in a file that is not the newest one.
        std::fs::write(
            dir.join("audit-2026010101.jsonl"),
            format!("{}{{\"torn", row("4")),
        )
        .unwrap();
        // The newest file's incomplete line may still be being written: not read.
        std::fs::write(
            dir.join("audit-2026010102.jsonl"),
            format!("{}{{\"half", row("5")),
        )
        .unwrap();

        let mut r = SpoolReader::open(&dir);
        let b = r.read(2).unwrap();
        assert_eq!(ids(&b), ["1", "2"]);
        assert_eq!(b.corrupt, 0);
        // Not committed: the same rows again (a failed insert is retried).
        let b = r.read(2).unwrap();
        assert_eq!(ids(&b), ["1", "2"]);
        r.commit(b.end).unwrap();

        let b = r.read(10).unwrap();
        assert_eq!(ids(&b), ["3", "4", "5"]);
        assert_eq!(b.corrupt, 2, "the broken line and the torn tail");
        // Reported once, even when read again before the commit.
        assert_eq!(r.read(10).unwrap().corrupt, 0);
        // A waiting batch grows from where it ended.
        let mut part = r.read(1).unwrap();
        assert_eq!(ids(&part), ["3"]);
        r.fill(&mut part, 10).unwrap();
        assert_eq!(ids(&part), ["3", "4", "5"]);
        assert_eq!(part.end, b.end);
        let end = b.end.clone();
        assert_eq!(end.file, "audit-2026010102.jsonl");
        r.commit(b.end).unwrap();
        // Files behind the cursor are gone; the cursor survives a reopen.
        assert_eq!(list_files(&dir).unwrap(), ["audit-2026010102.jsonl"]);
        let mut r = SpoolReader::open(&dir);
        assert_eq!(*r.cursor(), end);
        assert!(r.read(10).unwrap().rows.is_empty());

        // The writer finishes the line: it ships.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("audit-2026010102.jsonl"))
            .unwrap();
        f.write_all(b"\n").unwrap();
        f.write_all(row("6").as_bytes()).unwrap();
        let b = r.read(10).unwrap();
        assert_eq!(ids(&b), ["6"]);
        assert_eq!(b.corrupt, 1, "the half line, terminated");
        assert!(r.pending_bytes() > 0);
        r.commit(b.end).unwrap();
        assert_eq!(r.pending_bytes(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_line_written_before_end_user_existed_still_ships_with_it_empty() {
        let dir = temp_dir("old-line");
        let mut old = serde_json::to_value(AuditRow {
            request_id: "old".into(),
            tenant: "acme".into(),
            ..AuditRow::default()
        })
        .unwrap();
        old.as_object_mut().unwrap().remove("end_user");
        let new = AuditRow {
            request_id: "new".into(),
            end_user: "alice".into(),
            ..AuditRow::default()
        };
        let text = format!("{old}\n{}\n", serde_json::to_string(&new).unwrap());
        assert!(!text.lines().next().unwrap().contains("end_user"));
        std::fs::write(dir.join("audit-2026010100.jsonl"), text).unwrap();
        let b = SpoolReader::open(&dir).read(10).unwrap();
        assert_eq!(b.corrupt, 0);
        assert_eq!(ids(&b), ["old", "new"]);
        assert_eq!(
            (b.rows[0].tenant.as_str(), b.rows[0].end_user.as_str()),
            ("acme", "")
        );
        assert_eq!(b.rows[1].end_user, "alice");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unreadable_cursor_starts_over() {
        let dir = temp_dir("badcursor");
        std::fs::write(dir.join(CURSOR_FILE), "garbage").unwrap();
        std::fs::write(dir.join("audit-2026010100.jsonl"), row("1")).unwrap();
        let mut r = SpoolReader::open(&dir);
        assert_eq!(ids(&r.read(10).unwrap()), ["1"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
