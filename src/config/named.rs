//! Entries looked up by name while a config is validated, and the rules for names:
//! shared by the file's sections (`validate`) and by tenants from either source
//! (`tenant`), so neither has to reach into the other.

use super::report::{child, Report};
use std::collections::HashMap;
use std::sync::Arc;

/// Entries of one section, by name, including broken ones (as `None`).
pub(super) struct Named<T> {
    /// False when the section itself is missing or not a mapping: then nothing in it
    /// can be looked up, and references are not worth reporting.
    pub section_ok: bool,
    pub items: Vec<(String, Option<Arc<T>>)>,
    pub(super) index: HashMap<String, usize>,
}

pub(super) enum Ref<'a, T> {
    Found(&'a Arc<T>),
    /// Exists but has its own errors: already reported.
    Broken,
    Missing,
}

impl<T> Named<T> {
    /// Already-built entries (a running config's), for validating store tenants.
    pub fn from_built(values: &[Arc<T>], name: impl Fn(&T) -> &String) -> Named<T> {
        Named {
            section_ok: true,
            index: values
                .iter()
                .enumerate()
                .map(|(i, v)| (name(v).clone(), i))
                .collect(),
            items: values
                .iter()
                .map(|v| (name(v).clone(), Some(v.clone())))
                .collect(),
        }
    }

    pub fn get(&self, name: &str) -> Ref<'_, T> {
        match self.index.get(name).and_then(|&i| self.items.get(i)) {
            Some((_, Some(x))) => Ref::Found(x),
            Some((_, None)) => Ref::Broken,
            None if self.section_ok => Ref::Missing,
            None => Ref::Broken,
        }
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<T>> {
        self.items.iter().filter_map(|(_, x)| x.as_ref())
    }

    pub(super) fn into_values(self) -> Vec<Arc<T>> {
        self.items.into_iter().filter_map(|(_, x)| x).collect()
    }

    /// "`a`, `b`" for messages, so the operator sees what would have been accepted.
    pub fn known(&self) -> String {
        let names: Vec<String> = self.items.iter().map(|(n, _)| format!("`{n}`")).collect();
        if names.is_empty() {
            "none are defined".to_string()
        } else {
            format!("known: {}", names.join(", "))
        }
    }
}

/// Names travel in response headers, the comma-separated `x-gateway-fallback` header
/// and (for tenants) admin URL paths, so they are limited to what survives all three.
pub(super) fn check_name(section: &str, name: &str, at: &str, report: &mut Report) -> bool {
    let printable = name.bytes().all(|b| (0x21..=0x7e).contains(&b));
    let bad_char = if section == "tenants" {
        name.contains([',', '/', '?', '#', '%'])
    } else {
        name.contains(',')
    };
    if name.is_empty() || name.len() > 128 || !printable || bad_char {
        let extra = if section == "tenants" {
            ", `/`, `?`, `#`, `%`"
        } else {
            ""
        };
        report.error(
            at,
            format!(
                "the name must be 1 to 128 printable ASCII characters without spaces, `,`{extra}"
            ),
        );
        return false;
    }
    true
}

/// `at.section.key`, each part quoted on its own if it needs to be.
pub(super) fn sub(at: &str, section: &str, key: &str) -> String {
    child(&child(at, section), key)
}
