//! Collects problems while loading, each with the YAML path it belongs to.
//!
//! Checks run section by section in dependency order (providers before models before
//! tenants), not in file order; the report puts them back in the order the operator
//! reads the file before anyone sees them.

use super::ConfigError;
use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;
use serde_yaml::Value;
use std::collections::HashMap;

#[derive(Debug, Default)]
pub(super) struct Report {
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
    /// Path prefix -> (top-level position, entry position), filled while parsing.
    ranks: HashMap<String, (usize, usize)>,
}

impl Report {
    pub fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    pub fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// Records where a section or entry sits in the file, for ordering the output.
    pub fn rank(&mut self, path: String, top: usize, entry: usize) {
        self.ranks.insert(path, (top, entry));
    }

    pub fn into_errors(mut self) -> Vec<ConfigError> {
        let mut errors = std::mem::take(&mut self.errors);
        errors.sort_by_key(|e| self.position(&e.path));
        errors
    }

    pub fn warnings(&self) -> Vec<String> {
        let mut warnings: Vec<&ConfigError> = self.warnings.iter().collect();
        warnings.sort_by_key(|e| self.position(&e.path));
        warnings.iter().map(|w| w.to_string()).collect()
    }

    /// The rank of the longest recorded prefix of `path`; problems about things the
    /// file does not contain (a missing section) go last. The sort is stable, so
    /// problems within one entry keep the order they were found in.
    fn position(&self, path: &str) -> (usize, usize) {
        if path.is_empty() {
            return (0, 0);
        }
        let cuts = path
            .char_indices()
            .filter(|&(_, c)| c == '.' || c == '[')
            .map(|(i, _)| i)
            .chain(std::iter::once(path.len()));
        let mut best = None;
        for cut in cuts {
            if let Some(&r) = self.ranks.get(&path[..cut]) {
                best = Some(r);
            }
        }
        best.unwrap_or((usize::MAX, 0))
    }
}

/// `parent.key`, quoting keys that would otherwise read as several path segments.
pub(super) fn child(parent: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| !c.is_whitespace() && !matches!(c, '.' | '[' | ']' | '"'));
    let key = if plain {
        key.to_string()
    } else {
        format!("{key:?}")
    };
    if parent.is_empty() {
        key
    } else {
        format!("{parent}.{key}")
    }
}

pub(super) fn item(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// Deserializes one section or entry; on failure reports the innermost path that
/// went wrong (`tenants.acme.rate.rpz`) rather than just the entry.
pub(super) fn deserialize<T: DeserializeOwned>(
    value: Value,
    at: &str,
    report: &mut Report,
) -> Option<T> {
    deserialize_from(value, at, report)
}

/// [`deserialize`] from any format: the key store's JSON gets the same messages and
/// paths as the file's YAML.
pub(super) fn deserialize_from<'de, D: serde::Deserializer<'de>, T: DeserializeOwned>(
    de: D,
    at: &str,
    report: &mut Report,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Some(v),
        Err(e) => {
            let mut path = at.to_string();
            for segment in e.path().iter() {
                path = match segment {
                    Segment::Seq { index } => item(&path, *index),
                    Segment::Map { key } => child(&path, key),
                    Segment::Enum { variant } => child(&path, variant),
                    Segment::Unknown => child(&path, "?"),
                };
            }
            report.error(path, strip_position(&e.into_inner().to_string()));
            None
        }
    }
}

/// How a value is named in messages, in YAML terms rather than Rust's.
pub(super) fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing (null)",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// serde_json ends its messages with the position in the JSON text (`at line 1 column
/// 14`), which says nothing to someone who sent a field: the path already names it.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i)
            if msg[i + 9..]
                .split(" column ")
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) =>
        {
            msg[..i].to_string()
        }
        _ => msg.to_string(),
    }
}
