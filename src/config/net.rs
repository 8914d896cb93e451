//! Addresses and URLs, parsed once at load time.
//!
//! No URL crate is in the dependency tree and the accepted form is deliberately
//! narrow (`http(s)://host[:port][/prefix]`): anything else, such as credentials in
//! the authority or a query string, would be silently dropped or mangled when
//! request paths are appended, so it is refused instead.

use super::BaseUrl;
use std::net::{IpAddr, SocketAddr};

pub(super) fn socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.trim().parse().map_err(|_| {
        format!("`{text}` is not a socket address (expected IP:PORT, e.g. 127.0.0.1:8080 or [::1]:8080)")
    })
}

pub(super) fn base_url(text: &str) -> Result<BaseUrl, String> {
    let original = text.trim();
    let fail = |why: &str| {
        Err(format!(
            "`{original}` is not a usable base URL: {why} (expected http(s)://host[:port][/prefix])"
        ))
    };
    let lower = original.to_ascii_lowercase();
    let (tls, rest) = if lower.starts_with("https://") {
        (true, &original[8..])
    } else if lower.starts_with("http://") {
        (false, &original[7..])
    } else {
        return fail("the scheme must be http or https");
    };
    if rest.contains(['?', '#']) {
        return fail("a query string or fragment cannot be combined with request paths");
    }
    if rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return fail("it contains whitespace");
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return fail("credentials belong in api_key_env, not in the URL");
    }
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = match split_host_port(authority) {
        Ok(v) => v,
        Err(why) => return fail(why),
    };
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return fail("the port must be a number from 1 to 65535"),
        },
    };
    let path_prefix = path.trim_end_matches('/').to_string();
    Ok(BaseUrl {
        tls,
        host,
        port,
        path_prefix,
        original: original.to_string(),
    })
}

/// Splits `host[:port]`; an IPv6 literal must be bracketed and keeps its brackets.
fn split_host_port(authority: &str) -> Result<(String, Option<&str>), &'static str> {
    if authority.is_empty() {
        return Err("the host is missing");
    }
    if let Some(inner) = authority.strip_prefix('[') {
        let Some(end) = inner.find(']') else {
            return Err("an IPv6 address needs a closing bracket");
        };
        if inner[..end].parse::<std::net::Ipv6Addr>().is_err() {
            return Err("the bracketed host is not an IPv6 address");
        }
        let host = format!("[{}]", inner[..end].to_ascii_lowercase());
        return match &inner[end + 1..] {
            "" => Ok((host, None)),
            after => match after.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => Err("unexpected text after the IPv6 address"),
            },
        };
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    if host.is_empty() {
        return Err("the host is missing");
    }
    let is_ip = host.parse::<IpAddr>().is_ok();
    let is_name = host.split('.').all(|label| {
        !label.is_empty()
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    });
    if !is_ip && !is_name {
        return Err("the host is not a valid name or IPv4 address");
    }
    Ok((host.to_ascii_lowercase(), port))
}
