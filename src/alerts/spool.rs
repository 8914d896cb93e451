//! The alerts' durable queue: one append-only log, `<audit.spool_dir>/alerts/queue.log`.
//!
//! One JSON line per change, fsynced before the change counts:
//! - `{"add": <body>, "at_ms": N, "webhooks": [..]}`: an event queued for those webhooks;
//! - `{"done": "<id>", "webhook": ".."}`: a webhook answered 2xx for it;
//! - `{"seen": "<id>", "at_ms": N}`: another node took the event (Redis said so).
//!
//! Replaying the log gives what is still to deliver (adds minus dones, in order) and
//! every event id known here (adds and seens), which is the local half of "each event
//! once": a restart neither loses a pending event nor resends a delivered one. Events
//! are a few per tenant and hour, so an fsync per line costs nothing that matters.
//! A crash can tear the last line only; it is dropped (and cut off, so the next line
//! starts clean): its event was never acknowledged as queued, and the source raises it
//! again, because the same event has the same id. The log is rewritten (temp file,
//! fsync, rename) when it grows past [`COMPACT_BYTES`], keeping pending events and the
//! ids of the last [`SEEN_RETENTION_MS`].

use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Rewrite the log beyond this size.
pub const COMPACT_BYTES: u64 = 4 * 1024 * 1024;
/// How long an id is remembered: past the longest period an event is once for (a
/// calendar month), plus margin.
pub const SEEN_RETENTION_MS: u64 = 40 * 86_400_000;

/// One (event, webhook) still to deliver.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub id: String,
    pub webhook: String,
    pub body: Map<String, Value>,
}

/// What a replay found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub pending: Vec<Pending>,
    /// Every id known, with when it was raised (ms).
    pub seen: HashMap<String, u64>,
    /// Lines that could not be read (a torn last line included).
    pub bad_lines: usize,
}

pub struct Spool {
    path: PathBuf,
    file: File,
    bytes: u64,
}

impl Spool {
    /// Opens (creating `dir`) and replays the log; compacts it when it is large.
    pub fn open(dir: &Path, now_ms: u64) -> io::Result<(Spool, Loaded)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("queue.log");
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)?;
        let (loaded, good_len) = replay(&text);
        if good_len < text.len() as u64 {
            // A torn tail: cut it off so the next record starts on a line of its own.
            file.set_len(good_len)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        let mut spool = Spool {
            path,
            file,
            bytes: good_len,
        };
        if spool.bytes > COMPACT_BYTES {
            spool.compact(&loaded, now_ms)?;
        }
        Ok((spool, loaded))
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn append(&mut self, record: &Value) -> io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.sync_data()?;
        self.bytes += line.len() as u64;
        Ok(())
    }

    pub fn add(
        &mut self,
        body: &Map<String, Value>,
        at_ms: u64,
        webhooks: &[String],
    ) -> io::Result<()> {
        self.append(&json!({ "add": body, "at_ms": at_ms, "webhooks": webhooks }))
    }

    pub fn done(&mut self, id: &str, webhook: &str) -> io::Result<()> {
        self.append(&json!({ "done": id, "webhook": webhook }))
    }

    pub fn seen(&mut self, id: &str, at_ms: u64) -> io::Result<()> {
        self.append(&json!({ "seen": id, "at_ms": at_ms }))
    }

    /// Rewrites the log with only `state`'s pending events and its ids younger than
    /// [`SEEN_RETENTION_MS`]; atomic (rename), so a crash leaves the old or the new.
    pub fn compact(&mut self, state: &Loaded, now_ms: u64) -> io::Result<()> {
        let tmp = self.path.with_extension("log.tmp");
        let mut out = Vec::new();
        let mut queued: HashMap<&str, (&Map<String, Value>, Vec<&str>)> = HashMap::new();
        let mut order = Vec::new();
        for p in &state.pending {
            let entry = queued.entry(p.id.as_str()).or_insert_with(|| {
                order.push(p.id.as_str());
                (&p.body, Vec::new())
            });
            entry.1.push(p.webhook.as_str());
        }
        for (id, at_ms) in &state.seen {
            if queued.contains_key(id.as_str()) || now_ms.saturating_sub(*at_ms) > SEEN_RETENTION_MS
            {
                continue;
            }
            out.push(json!({ "seen": id, "at_ms": at_ms }));
        }
        for id in order {
            let (body, hooks) = &queued[id];
            let at_ms = state.seen.get(id).copied().unwrap_or(now_ms);
            out.push(json!({ "add": body, "at_ms": at_ms, "webhooks": hooks }));
        }
        let mut bytes = Vec::new();
        for r in out {
            bytes.extend(serde_json::to_vec(&r).map_err(io::Error::other)?);
            bytes.push(b'\n');
        }
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.bytes = bytes.len() as u64;
        Ok(())
    }
}

/// Replays the log's bytes; also returns the length of its readable prefix (all of it
/// unless the last line is torn).
fn replay(text: &[u8]) -> (Loaded, u64) {
    let mut out = Loaded::default();
    // (id, webhook) -> index in `pending`, so a `done` finds its entry.
    let mut pending: Vec<Option<Pending>> = Vec::new();
    let mut at: HashMap<(String, String), usize> = HashMap::new();
    let mut good_len = 0u64;
    let mut offset = 0usize;
    for raw in text.split_inclusive(|b| *b == b'\n') {
        offset += raw.len();
        let complete = raw.ends_with(b"\n");
        let record: Option<Value> = serde_json::from_slice(raw).ok();
        let Some(record) = record.filter(|_| complete) else {
            out.bad_lines += 1;
            if complete {
                good_len = offset as u64; // a bad line in the middle: skip it, keep going
            }
            continue;
        };
        good_len = offset as u64;
        if let Some(body) = record.get("add").and_then(Value::as_object) {
            let Some(id) = body.get("id").and_then(Value::as_str) else {
                out.bad_lines += 1;
                continue;
            };
            let at_ms = record.get("at_ms").and_then(Value::as_u64).unwrap_or(0);
            out.seen.insert(id.to_string(), at_ms);
            let hooks = record.get("webhooks").and_then(Value::as_array);
            for hook in hooks.into_iter().flatten().filter_map(Value::as_str) {
                let key = (id.to_string(), hook.to_string());
                if at.contains_key(&key) {
                    continue;
                }
                at.insert(key, pending.len());
                pending.push(Some(Pending {
                    id: id.to_string(),
                    webhook: hook.to_string(),
                    body: body.clone(),
                }));
            }
        } else if let Some(id) = record.get("done").and_then(Value::as_str) {
            let hook = record.get("webhook").and_then(Value::as_str).unwrap_or("");
            if let Some(i) = at.get(&(id.to_string(), hook.to_string())) {
                pending[*i] = None;
            }
        } else if let Some(id) = record.get("seen").and_then(Value::as_str) {
            let at_ms = record.get("at_ms").and_then(Value::as_u64).unwrap_or(0);
            out.seen.entry(id.to_string()).or_insert(at_ms);
        } else {
            out.bad_lines += 1;
        }
    }
    out.pending = pending.into_iter().flatten().collect();
    (out, good_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(id: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), id.into());
        m.insert("type".into(), "budget_threshold".into());
        m
    }

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("llmgw-alert-spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn round_trip_keeps_pending_and_seen_across_a_reopen() {
        let d = dir("rt");
        let hooks = vec!["a".to_string(), "b".to_string()];
        {
            let (mut s, l) = Spool::open(&d, 0).unwrap();
            assert!(l.pending.is_empty());
            s.add(&body("e1"), 10, &hooks).unwrap();
            s.add(&body("e2"), 20, &hooks[..1]).unwrap();
            s.done("e1", "a").unwrap();
            s.seen("e3", 30).unwrap();
        }
        let (_, l) = Spool::open(&d, 0).unwrap();
        let got: Vec<(&str, &str)> = l
            .pending
            .iter()
            .map(|p| (p.id.as_str(), p.webhook.as_str()))
            .collect();
        assert_eq!(got, [("e1", "b"), ("e2", "a")]);
        assert_eq!(l.pending[0].body, body("e1"));
        assert_eq!(l.seen.len(), 3);
        assert_eq!(l.seen["e3"], 30);
        assert_eq!(l.bad_lines, 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_cut_off() {
        let d = dir("torn");
        {
            let (mut s, _) = Spool::open(&d, 0).unwrap();
            s.add(&body("e1"), 10, &["a".to_string()]).unwrap();
        }
        let path = d.join("queue.log");
        let good = std::fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"add\":{\"id\":\"e2\",\"ty").unwrap();
        drop(f);
        {
            let (mut s, l) = Spool::open(&d, 0).unwrap();
            assert_eq!(l.pending.len(), 1);
            assert_eq!(l.bad_lines, 1);
            assert!(!l.seen.contains_key("e2"));
            assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
            s.done("e1", "a").unwrap();
        }
        let (_, l) = Spool::open(&d, 0).unwrap();
        assert!(
            l.pending.is_empty(),
            "the record after the tear reads cleanly"
        );
        assert_eq!(l.bad_lines, 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn compaction_keeps_pending_and_recent_ids_only() {
        let d = dir("compact");
        let day = 86_400_000;
        let now = 100 * day;
        let (mut s, _) = Spool::open(&d, now).unwrap();
        s.add(&body("old"), now - 50 * day, &["a".to_string()])
            .unwrap();
        s.done("old", "a").unwrap();
        s.add(&body("recent"), now - day, &["a".to_string()])
            .unwrap();
        s.done("recent", "a").unwrap();
        s.add(&body("waiting"), now - 60 * day, &["a".to_string()])
            .unwrap();
        drop(s);
        let (mut s, l) = Spool::open(&d, now).unwrap();
        s.compact(&l, now).unwrap();
        drop(s);
        let (_, l) = Spool::open(&d, now).unwrap();
        assert_eq!(l.pending.len(), 1);
        assert_eq!(l.pending[0].id, "waiting");
        assert!(l.seen.contains_key("recent"));
        assert!(
            l.seen.contains_key("waiting"),
            "pending is kept, however old"
        );
        assert!(!l.seen.contains_key("old"));
        let _ = std::fs::remove_dir_all(&d);
    }
}
