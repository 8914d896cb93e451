//! Process bootstrap: builds the Pingora server from a validated config and runs it.

use crate::admin::{Admin, Listener};
use crate::audit::AuditLog;
use crate::config::Config;
use crate::proxy::head_deadline::HeadDeadline;
use crate::proxy::{Gateway, Shared};
use crate::reload::{ReloadOnHup, Reloader};
use crate::tls::CertStore;
use pingora_core::apps::http_app::HttpServer;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;
use std::sync::Arc;

/// How the process was asked to run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub daemon: bool,
    pub upgrade: bool,
    /// The file the config came from, re-read on reload; none for the embedded one.
    pub config_path: Option<std::path::PathBuf>,
}

/// Longest wait, after SIGTERM, for in-flight streams to end (`LLM_GATEWAY_GRACE_PERIOD_S`
/// overrides it); an idle gateway exits at once. systemd's `TimeoutStopSec` must be
/// longer (see `systemd/llm-gateway.service`).
pub const GRACE_PERIOD_S: u64 = 30;

/// The longest a stop waits for requests in flight; the process exits before that
/// as soon as none is left (see `crate::shutdown`).
fn grace_period_s() -> u64 {
    std::env::var("LLM_GATEWAY_GRACE_PERIOD_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(GRACE_PERIOD_S)
}

fn server_conf() -> ServerConf {
    let mut conf = ServerConf {
        grace_period_seconds: Some(grace_period_s()),
        graceful_shutdown_timeout_seconds: Some(5),
        threads: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
        ..ServerConf::default()
    };
    // Pingora's defaults point at /tmp; keep them but make the names ours so two
    // gateways on one node do not take over each other's listeners.
    conf.pid_file = std::env::var("LLM_GATEWAY_PID_FILE")
        .unwrap_or_else(|_| "/tmp/llm-gateway.pid".to_string());
    conf.upgrade_sock = std::env::var("LLM_GATEWAY_UPGRADE_SOCK")
        .unwrap_or_else(|_| "/tmp/llm-gateway-upgrade.sock".to_string());
    // `-d` would otherwise chdir to `/`, breaking a relative `audit.spool_dir`.
    conf.working_directory = std::env::current_dir().ok();
    conf
}

impl crate::store::Host for Gateway {
    fn config(&self) -> Arc<Config> {
        Shared::config(self)
    }

    fn install(&self, cfg: Arc<Config>) {
        self.set_config(cfg);
    }
}

/// The store's state before the node serves: from the database, else the snapshot;
/// with neither the node starts not ready and the sync task keeps trying. On a
/// runtime of its own, since Pingora's do not run yet.
fn load_store(store: &Arc<crate::store::Store>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("store: cannot start a runtime: {e}");
            std::process::exit(1);
        }
    };
    let timeout = std::time::Duration::from_millis(
        std::env::var("LLM_GATEWAY_STORE_START_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5_000),
    );
    if let Err(e) = rt.block_on(store.initial_load(timeout)) {
        log::error!("{e}");
    }
}

/// Runs the gateway until it is told to stop; never returns.
pub fn run(config: Config, opts: RunOptions) -> ! {
    // Absolute, so that a reload after `-d` (which may change directory) finds the file.
    let config_path = opts
        .config_path
        .clone()
        .map(|p| std::path::absolute(&p).unwrap_or(p));
    let config = Arc::new(config);
    for w in &config.warnings {
        log::warn!("config: {w}");
    }
    let opt = Opt {
        upgrade: opts.upgrade,
        daemon: opts.daemon,
        nocapture: false,
        test: false,
        conf: None,
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf());
    server.bootstrap();

    let metrics = match crate::metrics::Metrics::new() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("cannot set up metrics: {e}");
            std::process::exit(1);
        }
    };
    metrics.register_providers(config.providers.iter().map(|p| p.name.as_str()));
    let (audit, audit_service) = match AuditLog::new(&config.audit, metrics.audit.clone()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "cannot open the audit spool {}: {e}",
                config.audit.spool_dir.display()
            );
            std::process::exit(1);
        }
    };
    server.add_service(background_service("audit log", audit_service));
    server.add_service(background_service(
        "exit when idle",
        crate::shutdown::ExitWhenIdle {
            audit: audit.clone(),
            grace: std::time::Duration::from_secs(grace_period_s()),
        },
    ));
    let node = format!("{}:{}", config.node.hostname, config.admin.listen.port());
    let alerts = match &config.alerts {
        None => crate::alerts::Alerts::default(),
        Some(conf) => {
            let started = crate::alerts::delivery::start(
                conf,
                &config.audit.spool_dir,
                &config.counters,
                node.clone(),
                metrics.alerts.clone(),
            );
            match started {
                Ok((alerts, service)) => {
                    server.add_service(background_service("alert delivery", service));
                    alerts
                }
                Err(e) => {
                    eprintln!("cannot start alert delivery: {e}");
                    std::process::exit(1);
                }
            }
        }
    };
    let gateway = Gateway::with_alerts(config.clone(), audit, metrics, alerts);
    server.add_service(background_service(
        "alert checks",
        crate::alerts::sources::Checker {
            gateway: gateway.clone(),
            node,
        },
    ));
    server.add_service(background_service(
        "deployment cooldowns",
        crate::proxy::refresh::Refresher {
            gateway: gateway.clone(),
        },
    ));
    server.add_service(background_service(
        "spend guards",
        crate::proxy::refresh::GuardWatch {
            gateway: gateway.clone(),
        },
    ));
    let mut proxy = Service::new(
        "llm-gateway".to_string(),
        HeadDeadline(Arc::new(pingora_proxy::http_proxy(
            &server.configuration,
            gateway.clone(),
        ))),
    );
    let mut client_listeners = Vec::new();
    if let Some(addr) = config.listen.http {
        proxy.add_tcp(&addr.to_string());
        client_listeners.push(Listener { addr, tls: None });
    }
    let mut cert_store = None;
    if let Some(https) = &config.listen.https {
        let store = match CertStore::load(https) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        };
        // The paths only name the files: with a resolver set, Pingora takes the
        // certificate from it on every handshake (see src/tls.rs).
        let mut tls = match TlsSettings::intermediate(
            &https.cert.to_string_lossy(),
            &https.key.to_string_lossy(),
        ) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("listen.https: {e}");
                std::process::exit(1);
            }
        };
        tls.set_cert_resolver(store.clone());
        // HTTP/2 and HTTP/1.1 by ALPN.
        tls.enable_h2();
        proxy.add_tls_with_settings(&https.addr.to_string(), None, tls);
        client_listeners.push(Listener {
            addr: https.addr,
            tls: Some(store.clone()),
        });
        cert_store = Some(store);
    }
    server.add_service(proxy);

    let store = config.store.as_ref().map(|conf| {
        let store = match crate::store::Store::open(conf, Arc::new(gateway.clone())) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("store: {e}");
                std::process::exit(1);
            }
        };
        load_store(&store);
        server.add_service(background_service(
            "tenant store sync",
            crate::store::sync::StoreSync(store.clone()),
        ));
        store
    });

    let reloader = Reloader::new(gateway.clone(), config_path, cert_store, store.clone());
    let mut admin = Service::new(
        "llm-gateway admin".to_string(),
        HttpServer::new_app(Admin::new(
            gateway,
            reloader.clone(),
            client_listeners,
            store,
        )),
    );
    admin.add_tcp(&config.admin.listen.to_string());
    server.add_service(admin);
    server.add_service(background_service(
        "config reload on SIGHUP",
        ReloadOnHup(reloader),
    ));

    log::info!(
        "llm-gateway serving on {}{}, admin on {}",
        config
            .listen
            .http
            .map_or(String::new(), |a| format!("http://{a} ")),
        config
            .listen
            .https
            .as_ref()
            .map_or(String::new(), |h| format!("https://{}", h.addr)),
        config.admin.listen
    );
    server.run_forever()
}
