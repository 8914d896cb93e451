//! The last state seen, on local disk, so a node can start while the database is down.
//!
//! One JSON document followed by a line `sha256:<hex of everything before it>`. It is
//! written to a temporary file, synced and renamed over the old one, so a reader sees
//! the old snapshot or the new one; a torn or edited file fails the checksum and is
//! refused whole, never half-loaded. The file holds key hashes (not secrets), so it
//! is created owner-only.

use super::{State, TenantRec};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

const FORMAT: &str = "llm-gateway-store-snapshot/1";

#[derive(Serialize, Deserialize)]
struct Doc {
    format: String,
    version: i64,
    written_ms: u64,
    tenants: Vec<TenantRec>,
}

pub fn write(path: &Path, state: &State) -> std::io::Result<()> {
    let mut tenants: Vec<TenantRec> = state.tenants.values().cloned().collect();
    tenants.sort_by(|a, b| a.id.cmp(&b.id));
    let doc = Doc {
        format: FORMAT.to_string(),
        version: state.version,
        written_ms: crate::audit::time::now_ms(),
        tenants,
    };
    let mut body = serde_json::to_vec(&doc).map_err(std::io::Error::other)?;
    let sum = hex::encode(Sha256::digest(&body));
    body.extend_from_slice(format!("\nsha256:{sum}\n").as_bytes());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The snapshot's state, or why it cannot be used.
pub fn read(path: &Path) -> Result<State, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| format!("{} is not UTF-8: refused", path.display()))?;
    let body = text.trim_end_matches('\n');
    let (doc, sum) = body.rsplit_once("\nsha256:").ok_or_else(|| {
        format!(
            "{} has no checksum line (torn write?): refused",
            path.display()
        )
    })?;
    if hex::encode(Sha256::digest(doc.as_bytes())) != sum.trim() {
        return Err(format!(
            "{} fails its checksum (torn or edited): refused",
            path.display()
        ));
    }
    let doc: Doc = serde_json::from_str(doc)
        .map_err(|e| format!("{} does not parse: {e}: refused", path.display()))?;
    if doc.format != FORMAT {
        return Err(format!(
            "{} has format `{}`, expected `{FORMAT}`: refused",
            path.display(),
            doc.format
        ));
    }
    let mut state = State {
        version: doc.version,
        ..State::default()
    };
    for t in doc.tenants {
        state.tenants.insert(t.id.clone(), t);
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::KeyRec;

    fn sample() -> State {
        let mut s = State {
            version: 7,
            ..State::default()
        };
        s.tenants.insert(
            "t1".into(),
            TenantRec {
                id: "t1".into(),
                spec: r#"{"models":["m"]}"#.into(),
                disabled: false,
                created_ms: 1,
                updated_ms: 2,
                keys: vec![KeyRec {
                    id: "k".into(),
                    spec: r#"{"id":"k","sha256":"00"}"#.into(),
                    created_ms: 1,
                    updated_ms: 1,
                    revoked_ms: None,
                }],
            },
        );
        s
    }

    #[test]
    fn round_trip_and_every_torn_prefix_is_refused() {
        let dir = std::env::temp_dir().join(format!("gw-snap-{}", std::process::id()));
        let path = dir.join("s.json");
        write(&path, &sample()).unwrap();
        let back = read(&path).unwrap();
        assert_eq!(back.version, 7);
        assert_eq!(back.tenants["t1"].keys[0].id, "k");
        let full = std::fs::read(&path).unwrap();
        for cut in [0, 1, full.len() / 2, full.len() - 10, full.len() - 2] {
            std::fs::write(&path, &full[..cut]).unwrap();
            let e = read(&path).map(|_| ()).unwrap_err();
            assert!(
                e.contains("refused") || e.contains("cannot read"),
                "{cut}: {e}"
            );
        }
        let mut edited = full.clone();
        let at = edited.iter().position(|&b| b == b'7').unwrap();
        edited[at] = b'8';
        std::fs::write(&path, &edited).unwrap();
        assert!(read(&path).unwrap_err().contains("checksum"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
