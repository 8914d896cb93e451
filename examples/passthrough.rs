//! Bare Pingora passthrough: the baseline `loadtest/bench.py` measures the gateway
//! against. It only implements `upstream_peer` (a fixed HTTP/1.1 address), so the
//! difference between it and the gateway is the cost of the gateway's policy, not of
//! Pingora itself.
//!
//! Usage: `passthrough LISTEN UPSTREAM` (e.g. `127.0.0.1:0 127.0.0.1:18001`); prints
//! `listening on ADDR` once the port is known. Worker threads follow the CPU affinity
//! mask, as in the gateway, so `taskset` pins both alike.

use async_trait::async_trait;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_proxy::{ProxyHttp, Session};
use std::net::{SocketAddr, TcpListener};

/// The same allocator as the gateway's build, so the comparison is of code, not malloc.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

struct Passthrough {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();
    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora_error::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: passthrough LISTEN UPSTREAM");
        std::process::exit(2);
    };
    let Ok(upstream) = upstream.parse::<SocketAddr>() else {
        eprintln!("UPSTREAM must be an ip:port, got {upstream}");
        std::process::exit(2);
    };
    // Resolve port 0 here so the caller learns the address before Pingora binds it.
    let listen = match TcpListener::bind(listen).and_then(|l| l.local_addr()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cannot bind {listen}: {e}");
            std::process::exit(2);
        }
    };
    let tag = std::process::id();
    let conf = ServerConf {
        threads: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
        pid_file: format!("/tmp/llmgw-passthrough-{tag}.pid"),
        upgrade_sock: format!("/tmp/llmgw-passthrough-{tag}.sock"),
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut proxy =
        pingora_proxy::http_proxy_service(&server.configuration, Passthrough { upstream });
    proxy.add_tcp(&listen.to_string());
    server.add_service(proxy);
    println!("listening on {listen}");
    server.run_forever()
}
