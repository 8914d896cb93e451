//! The `listen.https` certificate, swappable while the listener runs.
//!
//! Pingora builds its rustls acceptor once, when the listener starts, so a certificate
//! given as file paths would stay until the process is replaced. Handing Pingora a
//! [`ResolvesServerCert`] instead lets a config reload (SIGHUP, `POST
//! /admin/v1/reload`) install a renewed certificate: each handshake reads the current
//! one, connections already established keep theirs.

use crate::config::Https;
use pingora_rustls::sign::CertifiedKey;
use pingora_rustls::{
    CertificateDer, ClientConfig, ClientHello, CryptoProvider, DigitallySignedStruct,
    HandshakeSignatureValid, ResolvesServerCert, RusTlsError, ServerCertVerified,
    ServerCertVerifier, ServerName, SignatureScheme, TlsConnector, UnixTime,
};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use tokio::io::AsyncWriteExt;

/// The certificate and key every new TLS handshake presents.
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    /// Loads the certificate chain and key named by `listen.https`.
    pub fn load(https: &Https) -> Result<Arc<CertStore>, String> {
        Ok(Arc::new(CertStore {
            current: RwLock::new(load_pair(https)?),
        }))
    }

    /// Validates the new pair completely before installing it, so that a bad file leaves
    /// the running certificate in place.
    pub fn replace(&self, https: &Https) -> Result<(), String> {
        let fresh = load_pair(https)?;
        match self.current.write() {
            Ok(mut c) => *c = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(())
    }

    fn get(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// Readiness probe of the TLS listener at `addr`: a full handshake (a bare TCP connect
/// would make Pingora log a handshake error on every probe) that must present the
/// certificate this process currently serves. Sends no request.
pub async fn probe(store: &Arc<CertStore>, addr: SocketAddr) -> Result<(), String> {
    pingora_rustls::install_default_crypto_provider();
    let config = ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServesOurs(store.clone())))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::IpAddress(addr.ip().into());
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let _ = tls.shutdown().await;
    Ok(())
}

/// Accepts exactly the certificate the store holds: the probe talks to this process
/// over loopback, so identity is "the listener serves our current certificate".
#[derive(Debug)]
struct ServesOurs(Arc<CertStore>);

impl ServerCertVerifier for ServesOurs {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, RusTlsError> {
        match self.0.get().cert.first() {
            Some(ours) if ours.as_ref() == end_entity.as_ref() => {
                Ok(ServerCertVerified::assertion())
            }
            _ => Err(RusTlsError::General(
                "the listener presents another certificate".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RusTlsError> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RusTlsError> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        CryptoProvider::get_default()
            .map(|p| p.signature_verification_algorithms.supported_schemes())
            .unwrap_or_default()
    }
}

/// Parses the PEM files and checks that the key belongs to the first certificate.
fn load_pair(https: &Https) -> Result<Arc<CertifiedKey>, String> {
    pingora_rustls::install_default_crypto_provider();
    let (cert, key) = (https.cert.to_string_lossy(), https.key.to_string_lossy());
    // Pingora's loader does not say which file failed: check each first.
    for (name, path) in [("cert", &https.cert), ("key", &https.key)] {
        if let Err(e) = std::fs::File::open(path) {
            return Err(format!(
                "listen.https.{name}: cannot read {}: {e}",
                path.display()
            ));
        }
    }
    let (chain, key_der) = match pingora_rustls::load_certs_and_key_files(&cert, &key) {
        Ok(Some(pair)) => pair,
        Ok(None) => {
            return Err(format!(
                "listen.https: no certificate in {cert} or no private key in {key}"
            ))
        }
        Err(e) => return Err(format!("listen.https: {cert} / {key}: {e}")),
    };
    let provider = CryptoProvider::get_default()
        .ok_or_else(|| "listen.https: no TLS crypto provider installed".to_string())?;
    CertifiedKey::from_der(chain, key_der, provider)
        .map(Arc::new)
        .map_err(|e| format!("listen.https: {cert} and {key} do not make a usable pair: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_reported_with_their_path() {
        let https = Https {
            addr: "127.0.0.1:0".parse().unwrap(),
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
        };
        let e = CertStore::load(&https).unwrap_err();
        assert!(e.contains("listen.https"), "{e}");
        assert!(e.contains("/nonexistent/"), "{e}");
    }
}
