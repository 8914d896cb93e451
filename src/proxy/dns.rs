//! Asynchronous, cached name resolution for provider hosts.
//!
//! `HttpPeer::new` with a host name resolves synchronously on the request's worker
//! thread (and panics on failure), so peers are always built from socket addresses
//! resolved here, off the hot path once the cache is warm.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::RwLock;
use std::time::{Duration, Instant};

const TTL: Duration = Duration::from_secs(30);

/// Resolved addresses of one `(host, port)` and when they were looked up.
type Entry = (Vec<SocketAddr>, Instant);

#[derive(Default)]
pub struct Resolver {
    cache: RwLock<HashMap<(String, u16), Entry>>,
}

impl Resolver {
    /// The addresses of `host:port`; an IP literal costs nothing.
    pub async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let key = (host.to_string(), port);
        if let Ok(cache) = self.cache.read() {
            if let Some((addrs, at)) = cache.get(&key) {
                if at.elapsed() < TTL {
                    return Ok(addrs.clone());
                }
            }
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
        if addrs.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{host} has no address"),
            ));
        }
        if let Ok(mut cache) = self.cache.write() {
            cache.insert(key, (addrs.clone(), Instant::now()));
        }
        Ok(addrs)
    }
}
