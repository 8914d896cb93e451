//! Process bootstrap: builds the Pingora server from a validated config and runs it.

use crate::admin::Admin;
use crate::audit::AuditLog;
use crate::config::Config;
use crate::proxy::Gateway;
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

/// Seconds between SIGTERM and the end of in-flight streams (`LLM_GATEWAY_GRACE_PERIOD_S`
/// overrides it); systemd's `TimeoutStopSec` must be longer (see
/// `systemd/llm-gateway.service`).
pub const GRACE_PERIOD_S: u64 = 30;

fn server_conf() -> ServerConf {
    let mut conf = ServerConf {
        grace_period_seconds: Some(
            std::env::var("LLM_GATEWAY_GRACE_PERIOD_S")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(GRACE_PERIOD_S),
        ),
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
    conf
}

/// Runs the gateway until it is told to stop; never returns.
pub fn run(config: Config, opts: RunOptions) -> ! {
    let config_path = opts.config_path.clone();
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

    let (audit, shipper) = match AuditLog::new(&config.audit) {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "cannot open the audit spool {}: {e}",
                config.audit.spool_dir.display()
            );
            std::process::exit(1);
        }
    };
    server.add_service(background_service("audit shipper", shipper));
    let metrics = match crate::metrics::Metrics::new() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("cannot set up metrics: {e}");
            std::process::exit(1);
        }
    };
    let gateway = Gateway::new(config.clone(), audit, metrics);
    let mut proxy = pingora_proxy::http_proxy_service_with_name(
        &server.configuration,
        gateway.clone(),
        "llm-gateway",
    );
    if let Some(addr) = config.listen.http {
        proxy.add_tcp(&addr.to_string());
    }
    if let Some(https) = &config.listen.https {
        let tls =
            TlsSettings::intermediate(&https.cert.to_string_lossy(), &https.key.to_string_lossy())
                .map(|mut t| {
                    // HTTP/2 and HTTP/1.1 by ALPN.
                    t.enable_h2();
                    t
                });
        match tls {
            Ok(t) => proxy.add_tls_with_settings(&https.addr.to_string(), None, t),
            Err(e) => {
                eprintln!("listen.https: cannot load the certificate or key: {e}");
                std::process::exit(1);
            }
        }
    }
    server.add_service(proxy);

    let mut admin = Service::new(
        "llm-gateway admin".to_string(),
        HttpServer::new_app(Admin::new(gateway.clone(), config_path.clone())),
    );
    admin.add_tcp(&config.admin.listen.to_string());
    server.add_service(admin);
    server.add_service(background_service(
        "config reload on SIGHUP",
        ReloadOnHup {
            gateway,
            config_path,
        },
    ));

    log::info!(
        "llm-gateway serving on {:?}, admin on {}",
        config.listen.http,
        config.admin.listen
    );
    server.run_forever()
}

/// Reloads the config file on SIGHUP (`systemctl reload`), like `POST /admin/v1/reload`.
struct ReloadOnHup {
    gateway: Gateway,
    config_path: Option<std::path::PathBuf>,
}

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
                    let _ = crate::admin::reload(&self.gateway, self.config_path.as_ref());
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
