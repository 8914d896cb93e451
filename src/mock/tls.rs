//! The mock's TLS mode (`--tls-cert FILE --tls-key FILE`): HTTPS on the same port
//! for HTTP/2 and HTTP/1.1, chosen by ALPN, so the gateway's upstream HTTP/2 can be
//! tested against a provider that behaves like the real ones (which all offer `h2`).
//!
//! The protocol is taken from the negotiated ALPN rather than sniffed from the first
//! bytes: a client that offered only `http/1.1` must get HTTP/1.1 even if it then sent
//! something that looks like an h2 preface, exactly as a real provider would treat it.

use pingora_rustls::{ServerConfig, ServerTlsStream, TlsAcceptor};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// ALPN protocol ids, in the server's order of preference.
const H2: &[u8] = b"h2";
const HTTP11: &[u8] = b"http/1.1";
/// A client that connects and never finishes the handshake must not hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Certificate chain and private key files (PEM) of the TLS mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Loads the pair and builds the acceptor once, before the mock prints its ready
/// line, so a bad file fails `mock-provider` at start instead of every handshake.
pub fn acceptor(tls: &MockTls) -> io::Result<TlsAcceptor> {
    let (cert, key) = (path_str(&tls.cert)?, path_str(&tls.key)?);
    let (certs, key) = pingora_rustls::load_certs_and_key_files(cert, key)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e}")))?
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no certificate in {cert} or no private key in {key}"),
            )
        })?;
    pingora_rustls::install_default_crypto_provider();
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{cert}: {e}")))?;
    config.alpn_protocols = vec![H2.to_vec(), HTTP11.to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn path_str(p: &Path) -> io::Result<&str> {
    p.to_str().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not valid UTF-8", p.display()),
        )
    })
}

/// The handshake of one TLS connection: the stream, and whether the client and the
/// mock agreed on `h2` (else HTTP/1.1, no ALPN at all included, like real servers);
/// `None` when it failed or timed out.
pub async fn accept(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
) -> Option<(ServerTlsStream<TcpStream>, bool)> {
    // Small SSE frames must leave immediately, not wait for Nagle.
    let _ = stream.set_nodelay(true);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let h2 = tls.get_ref().1.alpn_protocol() == Some(H2);
            Some((tls, h2))
        }
        Ok(Err(e)) => {
            log::debug!("mock-provider: TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            log::debug!("mock-provider: TLS handshake timed out");
            None
        }
    }
}
