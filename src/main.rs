//! `llm-gateway` command line; all behaviour lives in the library.

use clap::{Parser, Subcommand};
use llm_gateway::config::{sha256_hex, Config};
use llm_gateway::{demo, mock, server};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Less CPU per request than glibc malloc at the same memory per stream (measured:
/// BENCHMARKS.md, "Allocator"); behind the `jemalloc` feature, which release builds use.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "llm-gateway",
    version,
    about = "Multi-tenant LLM inference gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Configuration file; the embedded demo defaults when absent.
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        /// Daemonize.
        #[arg(short = 'd', long)]
        daemon: bool,
        /// Take over the listeners of a running instance (graceful upgrade).
        #[arg(short = 'u', long)]
        upgrade: bool,
    },
    /// Validate a configuration file and print every problem.
    CheckConfig {
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
    /// Copy the file's tenants and keys into the tenant store (idempotent).
    ImportTenants {
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
    /// Print the sha256 hex of an API key, for a tenant's `api_keys`.
    HashKey { key: String },
    /// Run the local stand-in for OpenAI, Anthropic and in-house servers.
    MockProvider {
        #[arg(long)]
        listen: SocketAddr,
        /// Delay before the first token, in milliseconds.
        #[arg(long, default_value_t = 0)]
        ttft_ms: u64,
        /// Delay between streamed tokens, in milliseconds.
        #[arg(long, default_value_t = 0)]
        gap_ms: u64,
        /// Tokens per reply.
        #[arg(long, default_value_t = 16)]
        tokens: u32,
        /// Serve HTTPS with this certificate chain (PEM), HTTP/2 and HTTP/1.1 by ALPN.
        #[arg(long, requires = "tls_key", value_name = "FILE")]
        tls_cert: Option<PathBuf>,
        /// Private key (PEM) of --tls-cert.
        #[arg(long, requires = "tls_cert", value_name = "FILE")]
        tls_key: Option<PathBuf>,
    },
    /// Start the mock provider and a gateway on the embedded defaults.
    Demo {
        /// Client listener of the demo gateway.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin listener of the demo gateway.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
    },
}

fn main() -> ExitCode {
    llm_gateway::logging::init();
    match Cli::parse().command {
        Command::Serve {
            config,
            daemon,
            upgrade,
        } => {
            let loaded = match &config {
                Some(path) => Config::load(path),
                None => Config::from_yaml_str(&demo::demo_yaml_for_serve()),
            };
            match loaded {
                Ok(cfg) => server::run(
                    cfg,
                    server::RunOptions {
                        daemon,
                        upgrade,
                        config_path: config.clone(),
                    },
                ),
                Err(errors) => {
                    eprintln!("invalid configuration:\n{errors}");
                    ExitCode::from(2)
                }
            }
        }
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(cfg) => {
                for w in &cfg.warnings {
                    println!("warning: {w}");
                }
                // `serve` (and an upgrade's new process) would fail on this pair: say so
                // here, before systemd sends the running process SIGQUIT.
                if let Some(https) = &cfg.listen.https {
                    if let Err(e) = llm_gateway::tls::CertStore::load(https) {
                        eprintln!("{}: invalid configuration", config.display());
                        eprintln!("{e}");
                        return ExitCode::from(1);
                    }
                }
                println!(
                    "{}: ok ({} providers, {} models, {} tenants)",
                    config.display(),
                    cfg.providers.len(),
                    cfg.models.len(),
                    cfg.tenants.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{}: invalid configuration", config.display());
                eprintln!("{errors}");
                ExitCode::from(1)
            }
        },
        Command::ImportTenants { config } => match llm_gateway::store::import::run(&config) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("import-tenants: {e}");
                ExitCode::from(1)
            }
        },
        Command::HashKey { key } => {
            println!("{}", sha256_hex(&key));
            ExitCode::SUCCESS
        }
        Command::MockProvider {
            listen,
            ttft_ms,
            gap_ms,
            tokens,
            tls_cert,
            tls_key,
        } => {
            let opts = mock::MockOptions {
                listen,
                ttft_ms,
                gap_ms,
                tokens,
                tls: tls_cert
                    .zip(tls_key)
                    .map(|(cert, key)| mock::MockTls { cert, key }),
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("mock-provider: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(mock::run(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mock-provider: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Demo { listen, admin } => demo::run(listen, admin),
    }
}
