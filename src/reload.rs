//! Hot reload of the config file, on SIGHUP and on `POST /admin/v1/reload`.
//!
//! The new file is validated whole (and its TLS certificate loaded) before anything
//! changes; then the config is swapped in one pointer store. A request holds the
//! `Arc<Config>` it started with, so in-flight requests finish under the old config
//! while new ones see the new one. Settings bound when the process starts (listener
//! addresses, the counter store, the audit sink) are reported as needing an upgrade
//! (`serve -u`) rather than silently ignored.

use crate::config::Config;
use crate::proxy::Gateway;
use crate::tls::CertStore;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// What a successful reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub tenants: usize,
    /// Config keys whose new value applies only after a restart or upgrade.
    pub needs_restart: Vec<&'static str>,
}

/// Re-reads the config file the process was started with.
pub struct Reloader {
    gateway: Gateway,
    /// None when serving the embedded demo config: nothing to re-read.
    config_path: Option<PathBuf>,
    /// The `listen.https` certificate, when that listener runs.
    tls: Option<Arc<CertStore>>,
    /// One reload at a time (SIGHUP and the admin API may race).
    busy: Mutex<()>,
    /// The tenant store, whose tenants are merged into every config installed.
    store: Option<Arc<crate::store::Store>>,
}

impl Reloader {
    pub fn new(
        gateway: Gateway,
        config_path: Option<PathBuf>,
        tls: Option<Arc<CertStore>>,
        store: Option<Arc<crate::store::Store>>,
    ) -> Arc<Reloader> {
        Arc::new(Reloader {
            gateway,
            config_path,
            tls,
            busy: Mutex::new(()),
            store,
        })
    }

    /// Loads, validates and installs the config file; an invalid file (or certificate)
    /// is refused with the reason and the running config stays.
    pub fn reload(&self) -> Result<Reloaded, String> {
        let _one = match self.busy.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let result = self.try_reload();
        match &result {
            Ok(r) => log::info!(
                "config reloaded: {} tenants{}",
                r.tenants,
                if r.needs_restart.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; needs an upgrade to apply: {}",
                        r.needs_restart.join(", ")
                    )
                }
            ),
            Err(e) => log::error!("config reload refused, keeping the running config: {e}"),
        }
        result
    }

    fn try_reload(&self) -> Result<Reloaded, String> {
        let Some(path) = &self.config_path else {
            return Err("the gateway runs on the embedded config: nothing to reload".into());
        };
        let new = Config::load(path).map_err(|e| e.to_string())?;
        let old = self.gateway.config();
        let needs_restart = bound_at_start(&old, &new);
        if let (Some(store), Some(https)) = (&self.tls, &new.listen.https) {
            store.replace(https)?;
        }
        for w in &new.warnings {
            log::warn!("config: {w}");
        }
        let tenants = new.tenants.len();
        let providers: Vec<String> = new.providers.iter().map(|p| p.name.clone()).collect();
        match &self.store {
            // The store's tenants are rebuilt against the new file's models.
            Some(store) => store.install_file_config(new, &old)?,
            None => self.gateway.set_config(Arc::new(new)),
        }
        // Series of providers the file added exist at 0 from now on, as at start-up.
        self.gateway
            .metrics
            .register_providers(providers.iter().map(String::as_str));
        Ok(Reloaded {
            tenants,
            needs_restart,
        })
    }
}

/// Keys whose change cannot take effect in a running process.
fn bound_at_start(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.listen.http != new.listen.http {
        out.push("listen.http");
    }
    if old.listen.https.as_ref().map(|h| h.addr) != new.listen.https.as_ref().map(|h| h.addr) {
        out.push("listen.https.addr");
    }
    if old.admin.listen != new.admin.listen {
        out.push("admin.listen");
    }
    if old.counters != new.counters {
        out.push("counters");
    }
    if old.audit != new.audit {
        out.push("audit");
    }
    if old.store != new.store {
        out.push("store");
    }
    // The delivery task and its workers are built from the webhooks at start;
    // thresholds and velocity are read per check, so they reload.
    let hooks = |c: &Config| c.alerts.as_ref().map(|a| a.webhooks.clone());
    if hooks(old) != hooks(new) {
        out.push("alerts.webhooks");
    }
    out
}

/// Reloads on SIGHUP (`systemctl reload`), like `POST /admin/v1/reload`.
pub struct ReloadOnHup(pub Arc<Reloader>);

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for ReloadOnHup {
    async fn start(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            log::error!("cannot listen for SIGHUP: reload only through the admin API");
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    let reloader = self.0.clone();
                    // File reads and certificate parsing stay off the async workers.
                    let _ = tokio::task::spawn_blocking(move || reloader.reload()).await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(edit: impl Fn(String) -> String) -> Config {
        Config::from_yaml_str(&edit(crate::demo::demo_yaml_for_serve())).unwrap()
    }

    #[test]
    fn settings_bound_at_start_are_reported_others_are_not() {
        let base = config(|y| y);
        assert!(bound_at_start(&base, &config(|y| y)).is_empty());
        let moved = config(|y| y.replace("listen: 127.0.0.1:9090", "listen: 127.0.0.1:9191"));
        assert_eq!(bound_at_start(&base, &moved), vec!["admin.listen"]);
        let redis = config(|y| {
            y.replace(
                "backend: memory",
                "backend: redis\n  url: redis://127.0.0.1:6379",
            )
        });
        assert_eq!(bound_at_start(&base, &redis), vec!["counters"]);
        let hook = |url: &str, t: &str| {
            let section = format!(
                "alerts:\n  webhooks: [ {{ name: a, url: \"{url}\" }} ]\n  budget_thresholds: [{t}]\n"
            );
            config(move |y| format!("{y}\n{section}"))
        };
        let a = hook("http://127.0.0.1:1/", "0.5");
        assert_eq!(bound_at_start(&base, &a), vec!["alerts.webhooks"]);
        // Thresholds are read per check: they reload.
        assert!(bound_at_start(&a, &hook("http://127.0.0.1:1/", "0.9")).is_empty());
        assert_eq!(
            bound_at_start(&a, &hook("http://127.0.0.1:2/", "0.5")),
            vec!["alerts.webhooks"]
        );
    }
}
